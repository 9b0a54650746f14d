#!/usr/bin/env bash
# hakd GPU benchmarks: one H100/H200, a bare machine, under 8 minutes.
#
#   bash infra/bench/gpu.sh [key=value ...]     # key=value: fields of the "gpu" profile, infra/bench/common.py
#
# At 224 px, bf16 autocast + channels_last, random weights, generated images, no downloads:
#   cache   ViT-B/16 (vit_b16_clip) and WRN-101 (wrn101): bare teacher forward vs the cache path
#           (CacheWorker compute + side-stream copies into pinned buffers + Zarr shard writes on writer
#           threads), images/s; seconds per unit in each stage (compute, copy, encode, checksum, write,
#           verify), the bytes/s the bare forward would need, and the disk's own write rate with fsync
#   cache_shm   the same with the stores in /dev/shm (RAM): the pipeline without the disk
#   train   ResNet-50 step time: plain CE / resident KD / offline KD fed by FFCV / online KD with
#           ViT-B/16 run live (KD = PCA + GL)
#   loader  FFCV StudentLoader vs a torch DataLoader over the Zarr store, samples/s
#   analyze images/s per analysis measure (ResNet-50, WRN-101, ViT-B/16, bf16 where the measure allows) and the
#           projected time of the paper's CIFAR-10 analysis of five models (needs grad-cam and its imports)
# Prints one JSON line per benchmark (stdout; progress on stderr) and writes
# infra/bench/results/<gpu-name>-<date>.json after each benchmark (cache_shm and analyze are added to it at the end);
# with $OUT set, the results file and the JSON lines (bench-lines.jsonl) are copied there too.
#
# Environment variables: PYTHON (default python3), DEVICE (default cuda; DEVICE=cpu with --tiny as the
# first argument checks the script on a machine without a GPU), BENCH_TIMEOUT (seconds for cache, train
# and loader, default 330), SHM_TIMEOUT (seconds for cache_shm, default 60), ANALYZE_TIMEOUT
# (seconds for analyze, default 90), WHEELS (folder of wheels and .deb files to install first; default .whl
# if present). The three limits together: 8 minutes.
#
# What the machine needs. torch with CUDA, torchvision, timm, numpy, pyyaml, tqdm (all on the project's
# GPU image), and:
#   zarr, numcodecs, donfig, google-crc32c, xxhash   cache and train benches (the Zarr store)
#   ffcv, numba, opencv (cv2)                loader bench and the offline-KD step (the packed file)
# The script tries every import first and prints what is missing; a benchmark whose modules are
# missing is reported as skipped (so is the offline step without ffcv), the rest still run.
# The machine has no network: bring missing packages as wheels for its Python (3.12 on the image),
# made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 xxhash==4.1.0
# (`.whl/` is git-ignored; carry it to the machine). ffcv has no wheel on PyPI: build one for the
# machine's Python (`pip wheel --no-deps ffcv==1.0.2` where pkg-config, libopencv-dev and
# libturbojpeg0-dev are installed) and put the .deb files of the libraries it links
# (`apt-get download libturbojpeg0 libopencv-core406t64 libopencv-imgproc406t64` and their
# dependencies; `ldd` on ffcv's _libffcv*.so lists them) into the same folder. Wheels are installed
# with pip --no-index --target /tmp/hakd-site; .deb files are unpacked into /tmp/hakd-debs (never
# into /) and their library folders put on LD_LIBRARY_PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LIMIT=${BENCH_TIMEOUT:-330}
SHM_LIMIT=${SHM_TIMEOUT:-60}
ANALYZE_LIMIT=${ANALYZE_TIMEOUT:-90}
WHEELS=${WHEELS:-}
if [[ -z "$WHEELS" && -d .whl ]]; then WHEELS=.whl; fi

if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  whls=("$WHEELS"/*.whl)
  debs=("$WHEELS"/*.deb)
  shopt -u nullglob
  if (( ${#whls[@]} )); then
    echo "installing ${#whls[@]} wheel(s) from $WHEELS into /tmp/hakd-site" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hakd-site "${whls[@]}"
    export PYTHONPATH=/tmp/hakd-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if (( ${#debs[@]} )); then
    echo "unpacking ${#debs[@]} .deb file(s) from $WHEELS into /tmp/hakd-debs" >&2
    mkdir -p /tmp/hakd-debs
    for f in "${debs[@]}"; do dpkg -x "$f" /tmp/hakd-debs; done
    for d in /tmp/hakd-debs/usr/lib/x86_64-linux-gnu /tmp/hakd-debs/lib/x86_64-linux-gnu \
             /tmp/hakd-debs/usr/lib/x86_64-linux-gnu/blas /tmp/hakd-debs/usr/lib/x86_64-linux-gnu/lapack; do
      if [[ -d $d ]]; then export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
    done
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TQDM_DISABLE=1

# what is there, what is missing (a missing core module stops here; the rest are reported and skipped)
"$PY" - "$DEVICE" <<'PYEOF'
import importlib, sys
groups = {"core": ["torch", "torchvision", "timm", "numpy", "yaml", "tqdm"],
          "cache/train (Zarr)": ["zarr", "numcodecs", "xxhash"],
          "loader/offline KD (FFCV)": ["ffcv", "numba", "cv2"]}
missing = {}
for group, mods in groups.items():
    for m in mods:
        try:
            mod = importlib.import_module(m)
            print(f"  ok       {m} {getattr(mod, '__version__', '')}", file=sys.stderr)
        except Exception as e:
            missing.setdefault(group, []).append(m)
            print(f"  MISSING  {m}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
import platform
print(f"python {platform.python_version()} at {sys.executable}", file=sys.stderr)
for group, mods in missing.items():
    print(f"missing for {group}: {', '.join(mods)}; see the header of infra/bench/gpu.sh (WHEELS=...)",
          file=sys.stderr)
if "core" in missing:
    sys.exit(3)
if sys.argv[1] == "cuda":
    import torch
    if not torch.cuda.is_available():
        print("torch sees no GPU (torch.cuda.is_available() is False); DEVICE=cpu only checks the script",
              file=sys.stderr)
        sys.exit(4)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          file=sys.stderr)
PYEOF

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader >&2 || true

lines=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; lines=$OUT/bench-lines.jsonl; fi
errlog=$(mktemp)
start=$SECONDS
set +e
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" -m infra.bench.run gpu --device "$DEVICE" "$@" \
  2> >(tee "$errlog" >&2) | tee "$lines"
rc=${PIPESTATUS[0]}
echo "gpu.sh: python exited with $rc after $((SECONDS - start)) s (124 = hit BENCH_TIMEOUT=$LIMIT)" >&2

# extra runs merged into the results file under their own key: the cache bench again with its stores in RAM
# (/dev/shm) as cache_shm, and the analysis rates (5 models x CIFAR-10 projection) as analyze
results=$(sed -n 's/^\[bench\] results written to //p' "$errlog" | tail -1)
extra() {  # extra KEY LIMIT ARGS...: run `infra.bench.run ARGS`, add its JSON line to the results file as KEY
  local key=$1 limit=$2; shift 2
  local tmp; tmp=$(mktemp)
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m infra.bench.run "$@" | tee "$tmp"
  local erc=${PIPESTATUS[0]}
  echo "gpu.sh: $key exited with $erc after $((SECONDS - start)) s in all" >&2
  if [[ $erc == 0 && -n "$results" && -f "$results" ]]; then
    "$PY" - "$results" "$tmp" "$key" <<'PYEOF'
import json, sys
path, line, key = sys.argv[1], json.loads(open(sys.argv[2]).read().strip().splitlines()[-1]), sys.argv[3]
doc = json.load(open(path))
doc["benches"][key] = {**line, "bench": key}
open(path, "w").write(json.dumps(doc, indent=2) + "\n")
print(f"gpu.sh: {key} added to {path}", file=sys.stderr)
PYEOF
    if [[ -n "${OUT:-}" ]]; then cat "$tmp" >> "$lines"; fi
  fi
  rm -f "$tmp"
}
extra cache_shm "$SHM_LIMIT" cache --device "$DEVICE" "$@" store_dir=/dev/shm repeats=2
extra analyze "$ANALYZE_LIMIT" analyze --device "$DEVICE" "$@"
set -e
if [[ -n "${OUT:-}" && -n "$results" && -f "$results" ]]; then cp "$results" "$OUT/"; fi
rm -f "$errlog"
exit "$rc"
