"""The one typed configuration of hakd.

Every stage reads its section of `Config`. YAML files and `key.sub=value` overrides are
validated against these dataclasses before any work starts: an unknown key, a wrong type or an
impossible value raises `ConfigError` naming the key (the CLI turns it into exit status 2).
Defaults are the embedded demo (`infra/configs/demo.yaml` restates them).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.codec_spec import SHUFFLES, parse_codec, parse_feature_codec, parse_overrides
from infra.config_parse import ConfigError, build, convert, dotted, merge, parse_override, plain
from infra.shipped_weights import EMBEDDED, uses_embedded

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_OUT = "runs/demo"  # the output directory of every hakd command without --out
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
DATASETS = ("shapes", "cifar10", "stl10", "fashionmnist", "imagefolder")
STUDENTS = ("student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd")


@dataclass
class DataConfig:
    name: str = "shapes"          # shapes (generated, no download) | cifar10 | stl10 | fashionmnist | imagefolder
    root: str = "data"            # where real datasets live (torchvision layout) or the ImageFolder root
    download: bool = False        # let torchvision download real datasets when the network allows
    image_size: int = 32          # stored side length in pixels (images are kept as uint8 at this size)
    train_size: int = 2500        # shapes only: training images
    test_size: int = 500          # shapes: test images per variant; real data: cap on test images (0 = all)
    texture_correlation: float = 0.85  # shapes only: P(texture matches class) in train and clean test
    occlusion_fraction: float = 0.4    # fraction of the patch grid covered in the occluded variant
    seed: int = 0                 # the dataset, its variants and its views are a function of this seed
    verify_md5: bool = True       # cifar10 / stl10: refuse files whose md5 is not the official one (false: re-packed copies, test fixtures)
    skip_unreadable: bool = False  # imagefolder: leave out images that cannot be read (a truncated JPEG), counted in the stage line and listed in its run.json; false: the first one stops the run, named


@dataclass
class TeacherConfig:
    name: str = "vit_demo"        # registry name (teacher_cache.teachers.TEACHERS)
    weights: str | None = None    # local weights file; None = train (demo) or the hub cache (real)
    embedded: bool | None = None  # start from the weights shipped with hakd (vit_demo: pretrained on shape-only data, the demo's stand-in for CLIP); null = on the shapes data they were trained for, when no weights file is given
    layers: list[str] = field(default_factory=list)  # cached layers; empty = the registry default
    head: str = "auto"            # auto | trained (fit end to end) | probe (linear probe on pooled features) | pretrained (the embedded weights' own head, shapes only); auto = pretrained with embedded weights on shapes, trained for other demo teachers, else probe
    fit_epochs: int = 12          # demo teachers: epochs of end-to-end training on the training split
    fit_lr: float = 2e-3          # demo teachers: AdamW learning rate


@dataclass
class CacheConfig:
    views: int = 4                # K views per image; view 0 is the plain image, the others random-resized-crop + flip
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction range of the random crops
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # aspect ratio range of the random crops
    flip_prob: float = 0.5        # probability that a random view is mirrored
    shard_size: int = 512         # samples per shard = one Ray work unit = one writer
    chunk_size: int = 64          # samples per chunk inside a shard (must divide shard_size)
    batch_size: int = 128         # teacher forward batch
    clevel: int = 3               # Blosc level of the lz4 / zstd codecs
    codec: str = "lz4"            # every array's codec: none | lz4 | zstd (Blosc), or CODEC:SHUFFLE (docs/cache-format.md has measurements)
    codec_overrides: list[str] = field(default_factory=list)  # "NAME=CODEC" per array or group, e.g. features=zstd:noshuffle
    shuffle: str = "auto"         # Blosc's byte order where a codec names none: auto (noshuffle for CNN feature maps, whose zeros come in runs; bitshuffle else) | bitshuffle | shuffle | noshuffle
    feature_codec: str = "float16"  # float16 (exact) | int8 (per token, half the bytes) | pca:FRACTION:BITS[:MAX_RANK]: a PCA basis per layer fitted at cache time keeping FRACTION of the variance, its coefficients int8 or int4 per token, at most MAX_RANK of them (docs/cache-format.md, "Feature codecs")
    codec_max_error: float = 0.05  # bound on the codec's effect on every KD loss term (relative error of its value, 1 - cosine of its gradient), measured after caching; above it hakd refuses and names a codec to use instead
    workers: int = 2              # Ray actors writing shards in parallel
    writers: int = 0              # writer processes per actor, each encoding and writing whole units (own shards); 0 = auto: on a GPU the node's CPUs per GPU less one, on CPU one (teacher_cache/writers.py)
    location: str | None = None   # where the stores and fitted teachers live: None = OUT/cache and OUT/teachers; a shared path or an s3://bucket/prefix URL seen by every node (credentials: AWS_* variables, endpoint: AWS_ENDPOINT_URL)
    actor_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources each cache actor asks for, e.g. {hakd_cache_node: 1} pins the actors to nodes that offer it


@dataclass
class TrainConfig:
    students: list[str] = field(default_factory=lambda: ["student_kd_vit", "student_kd_cnn", "student_independent"])
    arch: str = "resnet_demo"     # student architecture (student_train.students.STUDENTS): resnet_demo | resnet50
    epochs: int = 4               # per trial; 3 seeds x 3 students fit the 10-minute demo
    batch_size: int = 128
    lr: float = 0.05              # SGD with Nesterov momentum, one-cycle schedule
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    kd_lambda: float = 1.0        # lambda in L = CE + lambda (w_attn L_attn + w_value L_value + w_gl L_GL); the hint weight for the CNN control
    pca_attn_weight: float = 300.0  # w_attn: PCA attention term; unweighted it carries <0.1% of the KD gradient (docs/loss.md)
    pca_value_weight: float = 1.0  # w_value: PCA value-relation term (V V^T / sqrt d)
    gl_weight: float = 1.0        # w_gl: GL token-regression term
    pca_swap_prob: float = 0.5    # partially-cross probability of swapping a student Q/K/V for the teacher's
    pca_qkv: str = "conv3x3"      # PCA projector's map to Q/K/V: conv3x3 (the paper's) | conv1x1 | dwsep (docs/loss.md)
    gl_groups: int = 4            # GL projector: groups per side of the token grid (4 -> 16 linear maps)
    logit_temperature: float = 4.0  # Hinton KD temperature (student_logit_kd)
    amp: bool = True              # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True    # on GPU
    compile: bool | None = None   # torch.compile the step in place (student, projectors, live ViT block); None = auto: on CUDA (0.75x the eager KD step on an H200), off on CPU (compiling takes minutes there)
    loader_workers: int = 2       # FFCV decoding threads
    loader_timeout_s: float = 120.0  # a loader that yields nothing for this long is an error, never a hang
    log_every: int = 50           # steps between host synchronisations for logging
    device: str = "auto"          # auto | cpu | cuda
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run of every student per seed (Ray Tune trials)
    views: int = 0                # train from the first k of the cache's K views (0: all K); 1 is the plain image alone, no augmentation
    trial_cpus: int = 1           # CPUs (and torch threads) per trial on a machine without GPUs; trials run side by side


@dataclass
class AnalysisConfig:
    models: list[str] = field(default_factory=lambda: [
        "teacher_vit", "teacher_cnn", "student_kd_vit", "student_kd_cnn", "student_independent"])
    eval_batch_size: int = 250
    fourier_radii: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])  # fraction of Nyquist
    cka_samples: int = 500        # test images used for CKA
    cka_batch_size: int = 100     # minibatch for the unbiased-HSIC accumulator
    gradcam_samples: int = 8      # images in the side-by-side GradCAM grid
    gradcam_eval_samples: int = 100  # images behind the quantitative GradCAM measures
    occlusion_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    adversarial_eps: list[float] = field(default_factory=lambda: [0.0, 0.002, 0.005, 0.01, 0.02])  # L-inf, pixels in [0, 1]
    adversarial_samples: int = 200
    pgd_steps: int = 5
    workers: int = 2              # Ray tasks in flight
    gpus_per_task: float = 1.0    # share of a GPU each task takes when the Ray cluster has GPUs (0.25: 4 tasks per GPU; 0: CPU only)
    bf16: bool = True             # on GPU: bf16 autocast for accuracy, Fourier, occlusion, shape bias and CKA forwards


@dataclass
class RayConfig:
    address: str | None = None    # None = start a local Ray; "auto" or host:port joins an existing cluster
    num_cpus: int | None = None   # local Ray only; None = all cores
    dashboard: bool = False       # local Ray dashboard (bound to 127.0.0.1)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher_vit: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="vit_demo"))
    teacher_cnn: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="wrn_demo", fit_epochs=8))
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # grid of train.* values, e.g. {"train.kd_lambda": [0.5, 1, 2]}: one trial per (student, seed, grid point)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    # written by hakd, not by users: each path of PATH_KEYS that the command made absolute, as [given, resolved]
    given_paths: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def digest(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none): what decides whether a stage is reusable.

        Paths count in the form they were given (a run is recognised from any directory); ray.* counts as its
        defaults (where the work runs changes no result: a run made on this machine is analysed on a cluster).
        data.skip_unreadable does not count: a run that skipped nothing has the data it would have without it,
        and one that skipped files has another data fingerprint, which its stores record."""
        d = self.to_dict()
        for key, (given, resolved) in d.pop("given_paths").items():
            section, name = key.split(".")
            if d[section][name] == resolved:
                d[section][name] = given
        del d["data"]["skip_unreadable"]
        d["ray"] = plain(dataclasses.asdict(RayConfig()))
        if d["train"]["views"] == 0:  # all views, as every run made before the key existed
            del d["train"]["views"]
        part = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


# every path in the config; a URL (cache.location = s3://...) is no path
PATH_KEYS = ("data.root", "teacher_vit.weights", "teacher_cnn.weights", "cache.location")


def resolve_paths(cfg: Config) -> Config:
    """The config with every path of PATH_KEYS absolute (`~` expanded) and each one changed recorded in
    given_paths. The command does this once, before any Ray task, actor or torchrun rank sees the config: they
    run in other directories (a Ray worker in the cluster's), where a relative path names another place."""
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or "://" in value:
            continue
        resolved = os.path.abspath(os.path.expanduser(value))
        if resolved != value:
            setattr(getattr(cfg, section), name, resolved)
            cfg.given_paths[key] = [value, resolved]
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (the demo when None), apply overrides, validate, return a `Config`."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH to a YAML file "
                          f"(examples in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    for o in overrides:
        data = merge(data, parse_override(o))
    if isinstance(data.get("sweep"), dict):  # `sweep.train.lr=[...]` nests the key; a sweep key is written whole
        data["sweep"] = dotted(data["sweep"])
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    if "feature_dtype" in (data.get("cache") or {}):  # the key's old name: say what replaced it
        raise ConfigError("cache.feature_dtype is now cache.feature_codec (float16 | int8 | pca:FRACTION:BITS"
                          "[:MAX_RANK]); rename the key")
    cfg = build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Impossible values, checked before any work starts."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    d, c, t, a = cfg.data, cfg.cache, cfg.train, cfg.analysis
    need(d.name in DATASETS, "data.name", f"{d.name!r} is not one of {', '.join(DATASETS)}")
    need(8 <= d.image_size <= 1024, "data.image_size", "must be between 8 and 1024")
    need(d.train_size > 0, "data.train_size", "must be positive")
    need(d.test_size >= 0, "data.test_size", "must be >= 0")
    need(0.0 <= d.texture_correlation <= 1.0, "data.texture_correlation", "must be in [0, 1]")
    need(0.0 <= d.occlusion_fraction < 1.0, "data.occlusion_fraction", "must be in [0, 1)")
    for role in ("teacher_vit", "teacher_cnn"):
        tc: TeacherConfig = getattr(cfg, role)
        need(tc.head in ("auto", "trained", "probe", "pretrained"), f"{role}.head",
             "must be auto, trained, probe or pretrained")
        need(tc.head != "pretrained" or (uses_embedded(tc, d) and d.name == "shapes"), f"{role}.head",
             "pretrained keeps the head of the embedded weights, which classifies the demo's shapes: use it with "
             "data.name=shapes and embedded weights, or choose probe")
        need(tc.fit_epochs >= 0, f"{role}.fit_epochs", "must be >= 0")
        need(tc.fit_lr > 0, f"{role}.fit_lr", "must be positive")
        if tc.weights is not None:
            need(Path(tc.weights).expanduser().is_file(), f"{role}.weights",
                 f"file {tc.weights} does not exist; give the path of a local weights file or null")
        if tc.embedded:
            need(tc.name in EMBEDDED, f"{role}.embedded",
                 f"hakd ships weights for {', '.join(EMBEDDED)} only, not {tc.name}; set {role}.embedded=false")
            need(tc.weights is None, f"{role}.embedded", f"and {role}.weights are both set; keep one of them")
            need(d.image_size == EMBEDDED[tc.name][2], f"{role}.embedded",
                 f"the embedded {tc.name} weights were trained at {EMBEDDED[tc.name][2]} px, not data.image_size="
                 f"{d.image_size}; set {role}.embedded=false (train it from scratch) or data.image_size="
                 f"{EMBEDDED[tc.name][2]}")
    need(c.views >= 1, "cache.views", "must be >= 1")
    need(0 < c.crop_scale[0] <= c.crop_scale[1] <= 1.0, "cache.crop_scale", "must satisfy 0 < min <= max <= 1")
    need(0 < c.crop_ratio[0] <= c.crop_ratio[1], "cache.crop_ratio", "must satisfy 0 < min <= max")
    need(0.0 <= c.flip_prob <= 1.0, "cache.flip_prob", "must be in [0, 1]")
    need(c.shard_size > 0 and c.chunk_size > 0, "cache.shard_size", "shard_size and chunk_size must be positive")
    need(c.shard_size % c.chunk_size == 0, "cache.chunk_size", f"must divide cache.shard_size ({c.shard_size})")
    need(c.batch_size > 0, "cache.batch_size", "must be positive")
    need(1 <= c.clevel <= 9, "cache.clevel", "must be in 1..9")
    need(c.workers >= 1, "cache.workers", "must be >= 1")
    need(c.writers >= 0, "cache.writers", "must be >= 0 (0 = as many as the node's CPUs allow)")
    need(c.location is None or (bool(c.location.strip()) and ("://" not in c.location or c.location.split("://", 1)[0]
                                                             in ("s3", "file") and bool(c.location.split("://", 1)[1].strip("/")))),
         "cache.location", f"{c.location!r} is not a path or an s3://bucket/prefix URL")
    need(all(v > 0 for v in c.actor_resources.values()), "cache.actor_resources",
         "every amount must be positive (e.g. {hakd_cache_node: 1})")
    for key, check in (("cache.codec", lambda: parse_codec(c.codec)),
                       ("cache.codec_overrides", lambda: parse_overrides(c.codec_overrides))):
        try:
            check()
        except ValueError as e:
            need(False, key, str(e))
    need(c.shuffle in SHUFFLES, "cache.shuffle", f"{c.shuffle!r} is not one of {', '.join(SHUFFLES)}")
    try:
        parse_feature_codec(c.feature_codec)
    except ValueError as e:
        need(False, "cache.feature_codec", str(e))
    need(c.codec_max_error > 0, "cache.codec_max_error", "must be positive")
    need(len(t.students) > 0, "train.students", "name at least one student")
    for s in t.students:
        need(s in STUDENTS, "train.students", f"{s!r} is not one of {', '.join(STUDENTS)}")
    need(len(set(t.students)) == len(t.students), "train.students", "names a student twice")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be positive")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    need(t.kd_lambda >= 0, "train.kd_lambda", "must be >= 0")
    for w in ("pca_attn_weight", "pca_value_weight", "gl_weight"):
        need(getattr(t, w) >= 0, f"train.{w}", "must be >= 0 (0 switches the term off)")
    need(0.0 <= t.pca_swap_prob <= 1.0, "train.pca_swap_prob", "must be in [0, 1]")
    need(t.pca_qkv in ("conv3x3", "conv1x1", "dwsep"), "train.pca_qkv",  # student_train.projectors.QKV_MAPS
         f"{t.pca_qkv!r} is not one of conv3x3 (the paper's), conv1x1, dwsep")
    need(t.gl_groups >= 1, "train.gl_groups", "must be >= 1")
    need(0 <= t.views <= c.views, "train.views",
         f"is {t.views}; must be between 1 and cache.views ({c.views}), or 0 for all of them")
    need(t.logit_temperature > 0, "train.logit_temperature", "must be positive")
    need(t.loader_workers >= 1, "train.loader_workers", "must be >= 1")
    need(t.loader_timeout_s > 0, "train.loader_timeout_s", "must be positive")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    valid_models = ("teacher_vit", "teacher_cnn", *STUDENTS)
    for m in a.models:
        need(m in valid_models, "analysis.models", f"{m!r} is not one of {', '.join(valid_models)}")
    need(a.eval_batch_size >= 1, "analysis.eval_batch_size", "must be >= 1")
    need(len(a.fourier_radii) > 0 and all(0 < r <= 1.5 for r in a.fourier_radii), "analysis.fourier_radii",
         "must be a non-empty list of fractions of Nyquist in (0, 1.5]")
    need(a.cka_samples >= 4, "analysis.cka_samples", "must be >= 4")
    need(a.cka_batch_size >= 4, "analysis.cka_batch_size", "must be >= 4 (the unbiased HSIC needs n > 3)")
    need(all(0 <= f < 1 for f in a.occlusion_fractions), "analysis.occlusion_fractions", "must lie in [0, 1)")
    need(all(e >= 0 for e in a.adversarial_eps), "analysis.adversarial_eps", "must be >= 0")
    need(a.pgd_steps >= 1, "analysis.pgd_steps", "must be >= 1")
    need(a.workers >= 1, "analysis.workers", "must be >= 1")
    need(0.0 <= a.gpus_per_task <= 1.0, "analysis.gpus_per_task",
         "must be in [0, 1]: a share of one GPU per task (0 runs the analysis on CPUs only)")
    need(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, "ray.num_cpus", "must be >= 1 or null")
    need(len(t.seeds) > 0, "train.seeds", "name at least one seed, e.g. [0, 1, 2]")
    need(len(set(t.seeds)) == len(t.seeds), "train.seeds", "names a seed twice")
    need(t.trial_cpus >= 1, "train.trial_cpus", "must be >= 1")
    _validate_sweep(cfg.sweep)
    for key, pair in cfg.given_paths.items():
        need(key in PATH_KEYS and len(pair) == 2, f"given_paths.{key}",
             f"hakd records here the paths it resolved, as [given, resolved] for one of {', '.join(PATH_KEYS)}; "
             f"remove the entry")


# train.* keys that do not change what a trial learns, or that the sweep itself sets
_NOT_SWEPT = ("train.students", "train.seeds", "train.trial_cpus", "train.device", "train.loader_workers",
              "train.loader_timeout_s", "train.log_every")


def _validate_sweep(sweep: dict[str, list]) -> None:
    """Each key names a train.* field (other sections would refit a teacher or re-pack); values fit its type."""
    train_fields = typing.get_type_hints(TrainConfig)
    for key, values in sweep.items():
        section, _, name = key.partition(".")
        if section != "train" or name not in train_fields:
            raise ConfigError(f"sweep.{key}: not a train.* config key; a sweep varies student training only "
                              f"(sweepable: {', '.join(k for f in train_fields if (k := 'train.' + f) not in _NOT_SWEPT)})")
        if key in _NOT_SWEPT:
            raise ConfigError(f"sweep.{key}: cannot be swept; set it directly"
                              + (" (seeds are train.seeds)" if key == "train.seeds" else ""))
        if not values:
            raise ConfigError(f"sweep.{key}: give at least one value")
        converted = [convert(v, train_fields[name], f"sweep.{key}[{i}]") for i, v in enumerate(values)]
        if len({json.dumps(v) for v in converted}) != len(converted):
            raise ConfigError(f"sweep.{key}: names a value twice")
        for v in converted:  # each grid point must itself be a valid config
            point = dataclasses.replace(TrainConfig(), **{name: v})
            try:
                validate(Config(train=point))
            except ConfigError as e:
                raise ConfigError(f"sweep.{key}: value {v!r} is impossible ({e})") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
