#!/usr/bin/env bash
# Adds to the GPU kit what ../shared/gpu/make-kit.sh leaves out: the analyze bench's grad-cam and its one
# dependency the GPU image lacks, ttach. Both are pure Python (py3-none-any), so one wheel serves the image's 3.12.
# grad-cam publishes only a source archive for its recent versions (a wheel for 1.0.0 alone), so its wheel is
# built here from that archive; ttach's wheel is downloaded. The image already has grad-cam's other needs
# (numpy, Pillow, torch, torchvision, tqdm, opencv-python-headless, matplotlib, scikit-learn, scipy).
#
#   bash infra/bench/kit-extra.sh [DEST]     # from the project root, after make-kit.sh; DEST defaults to .whl
#
# The versions are the ones the project's tests run with (grad-cam>=1.5.4 in pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dest=${1:-.whl}
mkdir -p "$dest"
PY=${PYTHON:-python3}
"$PY" -m pip wheel -q --no-deps grad-cam==1.5.7 -w "$dest"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
  -d "$dest" ttach==0.0.3
ls -1 "$dest"/grad_cam-*.whl "$dest"/ttach-*.whl
