"""Machine profiles of the benchmarks: what each measures on (models, sizes, repeats), and the `key=value`
overrides of `hakd bench`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from infra.errors import UserError


@dataclass
class Profile:
    name: str = "cpu"             # cpu | gpu | tiny (PROFILES)
    device: str = "cpu"            # cpu | cuda
    vit: str = "vit_demo"          # teacher_vit (ViT: its last-block input is cached, the block runs live)
    cnn: str = "wrn_demo"          # teacher_cnn
    student: str = "resnet_demo"   # student architecture
    image_size: int = 32           # stored image side; every model resizes to its own input size
    n_images: int = 512            # images in the bench cache
    views: int = 4                 # K views per image
    shard_size: int = 128          # samples per shard = one cache work unit
    chunk_size: int = 32           # samples per chunk inside a shard
    cache_batch: int = 128         # teacher forward batch
    train_batch: int = 64          # student batch (every step kind, and both loaders)
    loader_workers: int = 2        # FFCV threads
    amp: bool = False              # bf16 autocast (GPU)
    channels_last: bool = False    # GPU
    repeats: int = 3               # timed repeats behind every median
    train_warmup: int = 3          # train: untimed steps before the timed ones
    train_steps: int = 5           # train: steps per timed repeat
    analyze_test_size: int = 300   # analyze: synthetic test images per measure
    analyze_budget_s: int = 0      # analyze: no further measure starts after this many seconds (0 = none)
    threads: int = 0               # torch threads in this process (0 = every core)
    store_dir: str = ""            # cache: folder for the bench stores ("" = the bench's temp dir; /dev/shm = RAM)
    codec: str = "lz4"             # cache: cache.codec of the bench stores
    codec_overrides: str = ""      # cache: cache.codec_overrides, comma-separated NAME=CODEC
    shuffle: str = "auto"          # cache: cache.shuffle (Blosc's byte order)
    feature_codec: str = "float16"  # cache: cache.feature_codec
    writers: int = 0               # cache: cache.writers (writer processes per worker; 0 = auto)
    disk_probe_mb: int = 64        # cache: MB of the dd-like write that measures the store folder's disk
    cache_images: int = 0          # cache: images of the cache bench's own stores (0 = n_images; the images repeated)
    cache_repeats: int = 0         # cache: timed repeats of each of its four runs (0 = repeats)
    codec_units: int = 4           # codecs: units (shards) read per store
    calibration_images: int = 64   # teachers: images whose forwards set the random teachers' BatchNorm statistics
    stores: str = ""               # codecs: comma-separated store paths ("" = the bench's own two stores)


ZERO_OK = ("threads", "writers", "cache_images", "cache_repeats", "analyze_budget_s")  # 0 = auto / none

PROFILES = {
    # 2 CPU cores: the demo models at 32 px. One torch thread: the other core serves the pipeline (writer
    # processes, FFCV threads), and on a shared machine OpenMP barriers make 2 threads erratically slow.
    "cpu": Profile("cpu", n_images=256, views=2, shard_size=64, chunk_size=16, train_batch=32, train_warmup=5,
                   train_steps=4, analyze_test_size=200, threads=1,
                   cache_images=1024),  # cache: 16 units per teacher (over 4, the marginal rate swung by 20%)
    # one H100/H200: the paper's models at 224 px in bf16, random weights
    "gpu": Profile("gpu", device="cuda", vit="vit_b16_clip", cnn="wrn101", student="resnet50", image_size=224,
                   n_images=2048, views=2, shard_size=256, chunk_size=16, cache_batch=256, train_batch=128,
                   loader_workers=8, amp=True, channels_last=True, train_warmup=5, train_steps=8,
                   analyze_test_size=1024, disk_probe_mb=1024, calibration_images=256,
                   analyze_budget_s=45,  # an H200 measured 3 of ViT-B/16's measures in 50 s: keep what a short run gets
                   cache_images=8192, cache_repeats=2),  # cache: 32 units of 256 images x 2 views per teacher
    # tests (`profile=tiny`): every code path in seconds
    "tiny": Profile("tiny", n_images=32, views=2, shard_size=16, chunk_size=8, cache_batch=32, train_batch=8,
                    loader_workers=1, repeats=1, train_warmup=1, train_steps=2, analyze_test_size=40, threads=1,
                    disk_probe_mb=8, calibration_images=16),
}


def cores() -> int:
    return len(os.sched_getaffinity(0))  # the CPUs this process may use (Linux)


def resolve_profile(overrides: list[str] = ()) -> Profile:
    """The profile `profile=cpu|gpu|tiny` names (default: gpu where torch sees a GPU, else cpu) on `device=cpu|cuda`,
    with the other `key=value` overrides of its fields, typed and checked as config overrides are."""
    import torch
    from infra.config_parse import build, merge, parse_override
    data: dict = {}
    for o in overrides:
        data = merge(data, parse_override(o))
    device = data.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bench: device={device}: choose cpu{' or cuda' if torch.cuda.is_available() else ''}")
    name = data.pop("profile", "gpu" if device == "cuda" else "cpu")
    if name not in PROFILES or "name" in data:
        raise UserError(f"unknown bench profile {data.get('name', name)!r}; choose one of {', '.join(PROFILES)} with "
                        f"profile=NAME")
    fields = dataclasses.asdict(PROFILES[name])
    if device == "cpu":
        fields.update(amp=False, channels_last=False)
    p = build(Profile, {**fields, **data, "device": device})
    for key, value in dataclasses.asdict(p).items():
        if type(value) is int and value < (0 if key in ZERO_OK else 1):
            raise UserError(f"bench override {key}={value}: {key} takes an integer >= {0 if key in ZERO_OK else 1}")
    if p.shard_size % p.chunk_size or p.n_images < p.train_batch * 2 or p.views < 2:
        raise UserError(f"bench profile {p.name}: need chunk_size | shard_size, n_images >= 2 * train_batch, "
                        f"views >= 2 (got {p.chunk_size}, {p.shard_size}, {p.n_images}, {p.train_batch}, {p.views})")
    if (p.cache_images or p.n_images) < 2 * p.shard_size:  # its steady-state rate needs two units at least
        raise UserError(f"bench profile {p.name}: cache_images (0 = n_images) must be >= 2 * shard_size = "
                        f"{2 * p.shard_size} (got {p.cache_images or p.n_images})")
    return p
