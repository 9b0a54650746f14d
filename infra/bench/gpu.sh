#!/usr/bin/env bash
# hakd's benchmarks on a bare GPU machine: installs the wheel kit, then runs `hakd bench` with the GPU profile.
#
#   HAKD_COMMIT=<commit> bash infra/bench/gpu.sh [WHAT] [key=value ...]     # WHAT: default all (infra/bench/run.py)
#
# Packages missing on a machine without network (zarr, numcodecs, ffcv, grad-cam, ...) come as wheels and .deb
# files for its Python in .whl/ (git-ignored; carry it with the tree; grad-cam, a source archive only, needs
# `pip wheel --no-deps grad-cam==1.5.7 -w .whl` on a machine with network, and ttach==0.0.3 beside it): wheels
# go to /tmp/hakd-site (pip --no-index), .deb files are unpacked into /tmp/hakd-debs (never into /) with their
# library folders on LD_LIBRARY_PATH. A benchmark whose modules are still missing fails alone, naming the module.
# HAKD_COMMIT names the commit the tree was copied from (`git describe --always --dirty --abbrev=40`), since git
# on a copy names another one. The results file goes to $OUT where set, else ./bench-results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}  # PYTHON=.venv/bin/python in a checkout with its own environment
WHEELS=${WHEELS:-.whl}
shopt -s nullglob
whls=("$WHEELS"/*.whl)
debs=("$WHEELS"/*.deb)
if (( ${#whls[@]} )); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hakd-site "${whls[@]}"
  export PYTHONPATH=/tmp/hakd-site${PYTHONPATH:+:$PYTHONPATH}
fi
for f in "${debs[@]}"; do dpkg -x "$f" /tmp/hakd-debs; done
for d in /tmp/hakd-debs/usr/lib/x86_64-linux-gnu{,/blas,/lapack} /tmp/hakd-debs/lib/x86_64-linux-gnu; do
  if [[ -d $d ]]; then export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
what=all
if [[ $# -gt 0 && $1 != *=* ]]; then what=$1; shift; fi
exec "$PY" -m infra.cli bench --results "${OUT:-bench-results}" "$what" "$@"
