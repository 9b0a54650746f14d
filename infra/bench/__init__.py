"""`hakd bench`: the speed claims of hakd, measured.

Each benchmark prints one JSON line (device, versions, commit, figures, targets and whether each
was met); `hakd bench all` runs them all and writes `infra/bench/results/<device>-<date>.json`,
which `python -m infra.bench.table` turns into the README's performance table.

  cache    images/s of the cache path (compute + shard writes, writer thread overlapping) vs the
           bare teacher forward on the same views                       (common.py, cache.py)
  loader   samples/s of the FFCV StudentLoader vs a torch DataLoader reading the Zarr store
  train    step time: plain CE / KD with resident teacher tensors / KD fed by the FFCV loader /
           KD with the teacher run live
  analyze  wall time of analysis tasks with 1 vs 2 Ray workers

Every figure is a median over repeats taken after a warm-up, with the device synchronised before
the clock is read; comparisons are ratios of figures from the same run. Models are sized for the
machine (profile "cpu": the demo models at 32 px; profile "gpu": ViT-B/16, WRN-101, ResNet-50 at
224 px, bf16 autocast, channels_last, random weights). `infra/bench/gpu.sh` runs the GPU set on a
bare GPU machine.
"""
