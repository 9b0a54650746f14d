#!/usr/bin/env bash
# hakd GPU benchmarks: one H100/H200, a bare machine, under 9 minutes.
#
#   bash infra/bench/gpu.sh [key=value ...]     # key=value: fields of the "gpu" profile, infra/bench/profiles.py
#
# On a device machine of this workplace (its `run` tool copies the working tree; .whl/ is git-ignored, so carry it):
#   here, once per session:   ../shared/gpu/make-kit.sh && bash infra/bench/kit-extra.sh     # wheels into .whl/
#   here, before every call:  .venv/bin/python -m infra.bench.stamp    # the commit: the copy's git state is not ours
#   there:                    run(command="bash infra/bench/gpu.sh", carry=[".whl"], timeout_s=600)
# The stamp (infra/bench/source-stamp.json, untracked and not ignored, so it travels) names HEAD and hashes every
# tracked file; the results record its commit only while the tree still matches it, else git's answer (which on
# the copy named another commit). The first lines of the output say which commit will be recorded and from where.
#
# At 224 px, bf16 autocast + channels_last, random weights (BatchNorm statistics calibrated on the generated
# images, so that activations have a trained network's scale), generated images, no downloads:
#   cache   ViT-B/16 (vit_b16_clip) and WRN-101 (wrn101): bare teacher forward vs the cache path
#           (CacheWorker compute + side-stream copies into pinned buffers + Zarr shard writes in writer
#           processes) over the bench's own stores of 8,192 images x 2 views (32 units each), images/s over
#           a whole run and in the steady state (the judged steady_ratio, or steady_over_disk where the disk
#           cannot take the bare forward's bytes); seconds per unit in each stage (compute, copy, encode,
#           checksum, write, verify; 4 units), the bytes/s the bare forward would need, the disk's own write
#           rate with fsync, and what 1, 2, 4, ... writer processes sustain alone
#   writer  one writer process's wall and CPU seconds per ViT-B/16 unit, lz4 and none, on disk and in RAM, against
#           zarr's own assignment of the same arrays (infra/bench/writer.py)
#   cache_shm   the same with the stores in /dev/shm (RAM): the pipeline without the disk
#   cache_shm_int8   (not run by default) cache_shm with int8 features, uncompressed: half the feature bytes,
#           for a /dev/shm that cannot take the float16 units at the bare forward's rate (gVisor's: 2.4 GB/s)
#   train   ResNet-50 step time: plain CE / resident KD / offline KD fed by FFCV / online KD with
#           ViT-B/16 run live (KD = PCA + GL)
#   loader  FFCV StudentLoader vs a torch DataLoader over the Zarr store, samples/s
#   analyze images/s per analysis measure (ResNet-50, WRN-101, ViT-B/16, bf16 where the measure allows) and the
#           projected time of the paper's CIFAR-10 analysis of five models (needs grad-cam: kit-extra.sh)
# Prints one JSON line per benchmark (stdout; progress on stderr) and writes
# infra/bench/results/<gpu-name>-<date>.json after each benchmark (the extra runs, writer, cache_shm and analyze, are
# added to it at the end);
# with $OUT set, the results file and the JSON lines (bench-lines.jsonl) are copied there too.
# A benchmark that fails or is cut off by its time limit does not stop the others: the results file records it as
# {"error": "..."} and the script exits with the first non-zero status among its runs.
#
# Environment variables: BENCHES (what the main run measures, in the usual order: default gpu = cache,train,loader;
# any comma-separated list of cache, train, loader, analyze, e.g. BENCHES=cache,train; written to the results file
# whatever it holds), EXTRAS (the extra runs, default "writer cache_shm analyze"; empty = none), PYTHON (default
# .venv/bin/python where the checkout has one, else python3), DEVICE
# (default cuda; `DEVICE=cpu bash infra/bench/gpu.sh --tiny` checks the whole script in a few minutes on a
# machine without a GPU), BENCH_TIMEOUT (seconds for the BENCHES run, default 300), SHM_TIMEOUT
# (seconds for cache_shm, default 150), ANALYZE_TIMEOUT (seconds for analyze, default 90: the gpu profile starts
# no measure after 45 s, analyze_budget_s, so that it ends with the rates it has), WRITER_TIMEOUT (default 60),
# WHEELS (folder of wheels and .deb files to install first; default .whl if present and DEVICE is not cpu). The
# four limits together: 10 minutes (with DEVICE=cpu: 600, 180, 300 and 300 s, for a busy 2-core machine); on the
# device tool's 10-minute calls, drop an extra (EXTRAS). Measured on an H200: cache
# 112 s (cache_repeats=1) and train 108 s at 1ff612b, loader 18 s at a56e22f. One `run` call of the device
# tool may take 10 minutes, and a session has 15 minutes of device time, the machine's start included.
#
# What the machine needs. torch with CUDA, torchvision, timm, numpy, pyyaml, tqdm, scipy, opencv, matplotlib,
# scikit-learn (all on the project's GPU image), and:
#   zarr, numcodecs, donfig, google-crc32c, xxhash   cache and train benches (the Zarr store)
#   ffcv, numba, opencv (cv2)                loader bench and the offline-KD step (the packed file)
#   grad-cam, ttach                          analyze bench (pure-Python wheels: infra/bench/kit-extra.sh)
# The script tries every import first and prints what is missing; a benchmark whose modules are
# missing is reported as skipped (so is the offline step without ffcv), the rest still run.
# The machine has no network: bring missing packages as wheels for its Python (3.12 on the image):
# ../shared/gpu/make-kit.sh builds them all but grad-cam's (zarr and its small dependencies downloaded, ffcv built
# for 3.12, the .deb files of the libraries ffcv links), infra/bench/kit-extra.sh adds grad-cam and ttach.
# Wheels are installed with pip --no-index --target /tmp/hakd-site; .deb files are unpacked into /tmp/hakd-debs
# (never into /) and their library folders put on LD_LIBRARY_PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi  # the checkout's own (not carried)
DEVICE=${DEVICE:-cuda}
BENCHES=${BENCHES:-gpu}
EXTRAS=${EXTRAS-writer cache_shm analyze}  # set and empty: no extra runs
for x in $EXTRAS; do
  case $x in writer|cache_shm|cache_shm_int8|analyze) ;;
    *) echo "gpu.sh: EXTRAS: unknown extra run '$x' (writer, cache_shm, cache_shm_int8, analyze)" >&2; exit 2 ;;
  esac
done
if [[ $DEVICE == cpu ]]; then  # a check of the script on a (shared, slow) CPU machine, not a measurement
  LIMIT=${BENCH_TIMEOUT:-600}; SHM_LIMIT=${SHM_TIMEOUT:-300}; ANALYZE_LIMIT=${ANALYZE_TIMEOUT:-300}
  WRITER_LIMIT=${WRITER_TIMEOUT:-180}
else
  LIMIT=${BENCH_TIMEOUT:-300}; SHM_LIMIT=${SHM_TIMEOUT:-150}; ANALYZE_LIMIT=${ANALYZE_TIMEOUT:-90}
  WRITER_LIMIT=${WRITER_TIMEOUT:-60}
fi
WHEELS=${WHEELS:-}
if [[ -z "$WHEELS" && -d .whl && $DEVICE != cpu ]]; then WHEELS=.whl; fi  # the kit is for the GPU image's Python

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

"$PY" -m infra.bench.stamp --check >&2 || true

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader >&2 || true

lines=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; lines=$OUT/bench-lines.jsonl; fi
errlog=$(mktemp)
start=$SECONDS
status=0
set +e
what=$BENCHES
if [[ $what != gpu && $what != all && $what != *,* ]]; then what+=,; fi  # a list, even of one, writes the results file
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" -m infra.bench.run "$what" --device "$DEVICE" "$@" \
  2> >(tee "$errlog" >&2) | tee "$lines"
rc=${PIPESTATUS[0]}
echo "gpu.sh: python exited with $rc after $((SECONDS - start)) s (124 = hit BENCH_TIMEOUT=$LIMIT)" >&2
status=$rc
why() {  # why RC LIMIT-NAME LIMIT: what an exit status means, for the results file
  case $1 in
    124|137) echo "killed: hit $2=$3 s" ;;
    1) echo "a benchmark failed" ;;
    2) echo "bad arguments" ;;
    *) echo "see the log" ;;
  esac
}

# the results file: named by the run's log after every benchmark it finished; if it finished none, ask for the name
results=$(sed -n 's/^\[bench\] results written to //p' "$errlog" | tail -1)
if [[ -z "$results" ]]; then
  results=$("$PY" -m infra.bench.run "$what" --device "$DEVICE" "$@" --results-path 2>/dev/null | tail -1)
fi
if [[ -n "$results" && $rc != 0 ]]; then  # benches the run was in, or never reached, when it died
  names=$("$PY" -c 'import sys; from infra.bench.run import bench_names; print(*bench_names(sys.argv[1]))' "$what")
  # shellcheck disable=SC2086  # one word per bench name
  "$PY" -m infra.bench.merge "$results" $names --rc "$rc" --why "$(why "$rc" BENCH_TIMEOUT "$LIMIT")"
fi

# extra runs merged into the results file under their own key: one writer's cost per unit as writer, the cache
# bench again with its stores in RAM (/dev/shm) as cache_shm, the analysis rates (5 models x CIFAR-10) as analyze
extra() {  # extra KEY LIMIT-NAME LIMIT MODULE ARGS...: run `python -m MODULE ARGS`, add its JSON line (or why none) as KEY
  local key=$1 limit_name=$2 limit=$3 module=$4; shift 4
  local tmp; tmp=$(mktemp)
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m "$module" "$@" | tee "$tmp"
  local erc=${PIPESTATUS[0]}
  echo "gpu.sh: $key exited with $erc after $((SECONDS - start)) s in all" >&2
  if [[ $erc != 0 && $status == 0 ]]; then status=$erc; fi
  if [[ -n "$results" ]]; then
    "$PY" -m infra.bench.merge "$results" "$key" --line-from "$tmp" --rc "$erc" --why "$(why "$erc" "$limit_name" "$limit")"
  fi
  if [[ -n "${OUT:-}" ]]; then cat "$tmp" >> "$lines"; fi
  rm -f "$tmp"
}
for x in $EXTRAS; do
  case $x in
    writer) extra writer WRITER_TIMEOUT "$WRITER_LIMIT" infra.bench.writer --dir "${TMPDIR:-/tmp},/dev/shm" ;;
    cache_shm) extra cache_shm SHM_TIMEOUT "$SHM_LIMIT" infra.bench.run cache --device "$DEVICE" "$@" \
                 store_dir=/dev/shm cache_repeats=2 ;;
    cache_shm_int8) extra cache_shm_int8 SHM_TIMEOUT "$SHM_LIMIT" infra.bench.run cache --device "$DEVICE" "$@" \
                 store_dir=/dev/shm cache_repeats=2 feature_dtype=int8 codec_overrides=features=none ;;
    analyze) extra analyze ANALYZE_TIMEOUT "$ANALYZE_LIMIT" infra.bench.run analyze --device "$DEVICE" "$@" ;;
  esac
done
set -e
if [[ -n "$results" && -f "$results" ]]; then
  echo "gpu.sh: results in $results" >&2
  if [[ -n "${OUT:-}" ]]; then cp "$results" "$OUT/"; fi
else
  echo "gpu.sh: no results file was written" >&2
fi
rm -f "$errlog"
exit "$status"
