"""Train one student from the packed cache: CE, CE + lambda (PCA + GL), CE + hint, or logit KD.

The loop is the usual one with the teacher replaced by cached tensors: each batch brings raw
images, the view each was cached under, and the teacher's outputs for that view; the view is
replayed on the device so the student sees exactly the teacher's input. For the ViT teacher the
cache holds the residual stream entering its last block, and that one frozen block runs here to
give Q, K, V and the output tokens (see teacher_cache/teachers.py for why).

bf16 autocast and channels_last on GPU (bf16 needs no loss scaler), DDP when launched by torchrun
(WORLD_SIZE > 1; student_train/distributed.py), a checkpoint every epoch (model, projectors,
optimiser, schedule, epoch; the RNGs restart from (seed, rank, epoch)) from which a killed run
resumes to the same weights, and a `metrics.jsonl` line per epoch, written by rank 0 only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from infra import storage
from infra.config import Config
from infra.errors import UserError
from student_train.distributed import epoch_seed, init_distributed
from student_train.loader import StudentLoader
from student_train.losses import KDObjective, gradient_shares
from student_train.pack import packed_params
from student_train.students import Student
from teacher_cache.datasets import fingerprint, load_split
from teacher_cache.teachers import get_spec
from teacher_cache.views import apply_views

NEEDS = {"student_kd_vit": ("teacher_vit", "tokens"), "student_kd_cnn": ("teacher_cnn", "feature"),
         "student_logit_kd": ("teacher_vit", "logits"), "student_independent": (None, None)}
# The train.* keys each kind's objective reads, mapped to KDObjective's argument names. A kind is given its
# own keys and no others (every kind reads the rest of train.*), so a key listed only for other kinds cannot
# change what it learns: a sweep over that key trains it once per seed (student_train/sweep.py).
OBJECTIVE_KEYS = {
    "student_kd_vit": {"kd_lambda": "kd_lambda", "pca_attn_weight": "pca_attn_weight",
                       "pca_value_weight": "pca_value_weight", "gl_weight": "gl_weight",
                       "pca_swap_prob": "swap_prob", "pca_qkv": "pca_qkv", "gl_groups": "gl_groups"},
    "student_kd_cnn": {"kd_lambda": "kd_lambda"},
    "student_logit_kd": {"logit_temperature": "temperature"},
    "student_independent": {},
}


class CacheMismatch(UserError, RuntimeError):
    """The packed cache does not fit the student's config; raised before training starts."""


class LastBlockTargets(nn.Module):
    """The ViT teacher's last block, frozen: cached block input -> Q, K, V and output tokens.

    One pass through the block: its Q, K and V feed both the targets and the block's own attention
    (computing them apart and then running the block would run its QKV map twice). Under bf16 autocast
    on CUDA when `amp` (train.amp): in float32 this block cost a third of a ResNet-50 step on an H200
    (infra/bench/results). The residual stream itself stays float32."""

    def __init__(self, teacher_name: str, num_classes: int, image_size: int, params: dict[str, np.ndarray],
                 amp: bool = True):
        super().__init__()
        spec = get_spec(teacher_name)
        net = spec.build(num_classes, spec.input_size or image_size)
        self.block = net.blocks[-1]
        self.block.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        self.prefix = net.num_prefix_tokens
        self.heads = self.block.attn.num_heads
        self.grid = tuple(net.patch_embed.grid_size)
        self.amp = amp
        self.requires_grad_(False).eval()

    @classmethod
    def from_pack(cls, pack_dir: Path, meta: dict, amp: bool = True) -> "LastBlockTargets":
        """The block as `pack` copied it beside the packed file, of the ViT teacher the packed cache names."""
        params = packed_params(Path(pack_dir), meta, "teacher_vit", "live_block")
        return cls(meta["identities"]["teacher_vit"]["teacher"], meta["num_classes"], meta["image_size"], params, amp)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        b, n, d = x.shape
        block, attn = self.block, self.block.attn
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda and self.amp):
            qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            h = x + block.ls1(attn.proj(attn.norm(mixed)))  # timm's Attention after its SDPA (eval: no dropout)
            h = h + block.ls2(block.mlp(block.norm2(h)))
        p = self.prefix
        return {"q": q[:, :, p:], "k": k[:, :, p:], "v": v[:, :, p:], "h": h[:, p:]}


def _field(meta: dict, role: str, what: str, layer: str | None = None) -> str:
    for f, info in meta["fields"].items():
        if info["role"] != role:
            continue
        if what == "logits" and info["array"] == "logits":
            return f
        if what != "logits" and info["array"].startswith("features/") and (layer is None or info["array"] == f"features/{layer}"):
            return f
    raise CacheMismatch(f"the cache has no {what} {'for layer ' + layer if layer else ''} from {role}; "
                        f"add it to {role}.layers and re-run `hakd cache`")


def check_cache(cfg: Config, kind: str, meta: dict) -> dict:
    """Everything the student needs from the cache, checked up front; returns the field plan."""
    train_fp = fingerprint(load_split(cfg.data, "train"))
    for role, ident in meta["identities"].items():
        if ident["dataset"]["fingerprint"] != train_fp:
            raise CacheMismatch(f"the cache of {role} was computed on other data than data.* describes "
                                f"(dataset fingerprint differs); re-run `hakd cache` for this config")
        if ident["views"]["k"] != cfg.cache.views:
            raise CacheMismatch(f"the cache of {role} holds {ident['views']['k']} views per image, "
                                f"cache.views is {cfg.cache.views}; re-run `hakd cache`")
        if ident["teacher"] != getattr(cfg, role).name:
            raise CacheMismatch(f"the cache of {role} is from teacher {ident['teacher']}, the config names "
                                f"{getattr(cfg, role).name}; re-run `hakd cache`")
        coded = ident.get("feature_codec", ident.get("feature_dtype"))
        if coded != cfg.cache.feature_codec:
            raise CacheMismatch(f"the cache of {role} holds features coded {coded}, cache.feature_codec is "
                                f"{cfg.cache.feature_codec}; re-run `hakd cache` (and `hakd train`, which packs "
                                f"again) with this config, or set cache.feature_codec={coded}")
    return target_plan(kind, meta)


def target_plan(kind: str, meta: dict) -> dict:
    """{"role": the teacher a kind learns from, "field": the packed field of its cached output} (no field for
    the independent student); CacheMismatch when the packed cache lacks it."""
    role, what = NEEDS[kind]
    plan = {"role": role}
    if what == "tokens":
        depth = len(get_spec(meta["identities"][role]["teacher"]).build(meta["num_classes"], meta["image_size"]).blocks)
        plan["field"] = _field(meta, role, "tokens", f"blocks.{depth - 2}")
    elif what == "feature":
        plan["field"] = _field(meta, role, "feature")
    elif what == "logits":
        plan["field"] = _field(meta, role, "logits")
    return plan


def _feature_shape(meta: dict, field: str) -> list[int]:
    """The per-view shape a packed feature field decodes to (a coded field's own shape is its codes')."""
    info = meta["fields"][field]
    return info.get("feature_shape", info["shape"])


def teacher_sizes(kind: str, meta: dict, plan: dict, live: LastBlockTargets | None) -> dict:
    """The teacher's sizes `kind`'s KDObjective is built with: the ViT's teacher_dim (D), num_heads and grid
    ((gh, gw) tokens) from its live block, the CNN's teacher_channels (C); {} for the other kinds."""
    if kind == "student_kd_vit":
        return {"teacher_dim": _feature_shape(meta, plan["field"])[-1], "num_heads": live.heads, "grid": live.grid}
    if kind == "student_kd_cnn":
        return {"teacher_channels": _feature_shape(meta, plan["field"])[0]}
    return {}


class _Step(nn.Module):
    """Student + objective as one module, so DDP reduces the projectors' gradients too."""

    def __init__(self, student: Student, objective: KDObjective, kd_layer: str):
        super().__init__()
        self.student, self.objective, self.kd_layer = student, objective, kd_layer

    def forward(self, x, labels, teacher):
        logits, feats = self.student.forward_with(x, (self.kd_layer,))
        total, terms = self.objective(logits, labels, feats[self.kd_layer], teacher)
        return total, terms, logits, feats[self.kd_layer]


@dataclass
class _Training:
    """What every epoch of one student's training works with."""
    model: nn.Module                # step_module, or its DDP wrapper under torchrun
    step_module: _Step
    loader: StudentLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    live: LastBlockTargets | None   # the ViT teacher's live last block (student_kd_vit only)
    plan: dict                      # check_cache's: the teacher and the packed field the objective reads
    cfg: Config
    device: str
    rank: int
    kind: str                       # the student, e.g. student_kd_vit


def train_student(cfg: Config, kind: str, out_dir: Path, beton: Path, meta: dict, device: str = "cpu",
                  log=print, on_epoch=None) -> dict:
    """Train (or resume) one student into out_dir; returns the final metrics line.

    on_epoch(metrics), when given, is called on rank 0 after each epoch's checkpoint is written
    (the sweep reports to Ray Tune with it)."""
    rank, world = init_distributed()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    t = cfg.train
    plan = check_cache(cfg, kind, meta)
    torch.manual_seed(cfg.seed)
    num_classes = meta["num_classes"]
    student = Student(t.arch, num_classes, cfg.data.image_size)
    kd_layer = student.spec.kd_layer
    live = None
    kw = dict(kind=kind, student_channels=student.channels(kd_layer), label_smoothing=t.label_smoothing,
              **{arg: getattr(t, key) for key, arg in OBJECTIVE_KEYS[kind].items()})
    if kind == "student_kd_vit":
        live = LastBlockTargets.from_pack(Path(beton).parent, meta, t.amp).to(device)
    kw.update(teacher_sizes(kind, meta, plan, live))
    step_module = _Step(student, KDObjective(**kw), kd_layer).to(device)
    on_gpu = device.startswith("cuda")
    if on_gpu and t.channels_last:
        step_module = step_module.to(memory_format=torch.channels_last)
    if world > 1 and on_gpu:  # per-GPU batches are small: normalise over the global batch (CUDA only in torch)
        step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
    if t.compile or (t.compile is None and on_gpu):
        # in place (state_dict keys unchanged), one graph each: the KD feature map is an input of the
        # objective's graph, so gradient_shares can differentiate with respect to it
        for module in (student, step_module.objective, live):
            if module is not None:
                module.compile()
    model = nn.parallel.DistributedDataParallel(step_module) if world > 1 else step_module

    fields = [plan["field"]] if plan.get("field") else []
    loader = StudentLoader(beton, meta, fields, t.batch_size // world, t.loader_workers, cfg.seed,
                           t.loader_timeout_s, distributed=world > 1, views=t.views)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise CacheMismatch(f"train.batch_size {t.batch_size} exceeds the {meta['images']} cached images")
    opt = torch.optim.SGD(step_module.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    total_steps = t.epochs * steps_per_epoch
    # OneCycleLR divides 0 by 0 when the warm-up is exactly one step (pct_start * total_steps == 1)
    pct_start = 0.25 if total_steps * 0.25 != 1 else 0.5
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=total_steps, pct_start=pct_start)
    ckpt_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    start_epoch = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("digest") == _digest(cfg, kind):
            step_module.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["schedule"])
            start_epoch = ck["epoch"] + 1
            log(f"{kind}: resuming after epoch {ck['epoch'] + 1}/{t.epochs}")
    if rank == 0 and metrics_path.exists():  # drop lines of epochs that will be re-run, and a line cut short
        kept = [l for l in metrics_path.read_text().splitlines() if l and _epoch_of(l) < start_epoch]
        storage.write_bytes(metrics_path, "".join(k + "\n" for k in kept).encode())

    clean = load_split(cfg.data, "clean")
    run = _Training(model, step_module, loader, opt, sched, live, plan, cfg, device, rank, kind)
    last = {}
    for epoch in range(start_epoch, t.epochs):
        # every RNG the epoch draws from (CPU and CUDA: the PCA swap) restarts from (seed, rank, epoch), so the
        # checkpoint's epoch number restores them all on resume, and each rank draws its own swap masks
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        last = _run_epoch(run, epoch)
        last["test_clean_accuracy"] = _evaluate(student, clean, device, cfg.analysis.eval_batch_size)
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            storage.save_tensors({"model": step_module.state_dict(), "optimizer": opt.state_dict(),
                                  "schedule": sched.state_dict(), "epoch": epoch,
                                  "digest": _digest(cfg, kind)}, ckpt_path)
            if on_epoch is not None:
                on_epoch(last)
            log(f"{kind} epoch {epoch + 1}/{t.epochs}: loss {last['loss']:.3f} train acc {last['train_accuracy']:.3f} "
                f"test acc {last['test_clean_accuracy']:.3f} ({last['images_per_s']:.0f} img/s)")
    if rank == 0:
        storage.save_tensors(student.cpu().state_dict(), out_dir / "model.pt")
        if not last and metrics_path.exists():
            last = json.loads(metrics_path.read_text().splitlines()[-1])
    return last


def _run_epoch(run: _Training, epoch: int) -> dict:
    """Train one epoch; returns its metrics line (loss by term, train accuracy, lr, gradient shares, img/s)."""
    model, step_module, loader, opt, sched, live, plan = (run.model, run.step_module, run.loader, run.opt,
                                                           run.sched, run.live, run.plan)
    cfg, device, rank, kind = run.cfg, run.device, run.rank, run.kind
    t = cfg.train
    student = step_module.student
    step_module.train()
    loader.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    # each KD term's gradient norm and share at the KD layer, measured every log_every steps (rank 0)
    grad_sums: dict[tuple[str, str], torch.Tensor] = {}
    grad_steps = 0
    correct = torch.zeros((), device=device)
    seen, start = 0, time.time()
    bar = tqdm(total=len(loader), desc=f"{kind} epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False,
               disable=rank != 0)
    on_gpu = str(device).startswith("cuda")
    for i, batch in enumerate(loader):
        x, labels, teacher = prepare_batch(loader, batch, plan, live, kind, student.input_size, device)
        if on_gpu and t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16, enabled=on_gpu and t.amp):
            total, terms, logits, feature = model(x, labels, teacher)
        if rank == 0 and kind in ("student_kd_vit", "student_kd_cnn") and i % t.log_every == 0:
            measured = gradient_shares(step_module.objective.contributions(terms), feature)
            for what, per_term in measured.items():
                for name, value in per_term.items():
                    key = (what, name)
                    grad_sums[key] = grad_sums.get(key, 0.0) + value.detach()
            grad_steps += 1
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        # accumulate on the device; the host synchronises only every log_every steps
        for k, v in {"loss": total, **terms}.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        bar.update(1)
        if (i + 1) % t.log_every == 0:
            bar.set_postfix(loss=f"{(sums['loss'] / seen).item():.3f}",
                            img_s=f"{seen / (time.time() - start):.0f}")
    bar.close()
    stats = torch.stack([sums[k] for k in sorted(sums)] + [correct.float(), torch.tensor(float(seen), device=device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    total_seen = stats[-1].item()
    out = {"epoch": epoch, **{k: stats[j].item() / total_seen for j, k in enumerate(sorted(sums))},
           "train_accuracy": stats[-2].item() / total_seen, "lr": sched.get_last_lr()[0],
           "images_per_s": total_seen / (time.time() - start), "seconds": time.time() - start}
    if grad_steps:
        means = torch.stack(list(grad_sums.values())).div(grad_steps).tolist()
        for (what, name), value in zip(grad_sums, means):
            out.setdefault(what, {})[name] = value
        out["grad_measured_steps"] = grad_steps
    return out


def prepare_batch(loader: StudentLoader, batch: dict, plan: dict, live: LastBlockTargets | None, kind: str,
                  input_size: int, device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One loader batch on `device` as the student trains on it: its input, each image's cached view replayed
    (float (B, 3, input_size, input_size) in [0, 1]), the labels (B,), and the teacher targets `kind`'s
    objective reads (losses._TEACHER_KEYS): the ViT's q, k, v (B, heads, N, d) and h (B, N, D) from the live
    last block, the CNN's feature (B, C, H, W), or the ViT's logits (B, classes); {} for the independent one."""
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    x = apply_views(images, batch["view"].to(device, non_blocking=True), input_size)
    teacher = {}
    if plan.get("field"):
        cached = loader.teacher_output(batch, plan["field"], device)  # coded features are decoded on the device
        if kind == "student_kd_vit":
            teacher = live(cached)
        elif kind == "student_kd_cnn":
            teacher = {"feature": cached}
        else:
            teacher = {"logits": cached}
    return x, labels, teacher


@torch.no_grad()
def _evaluate(student: Student, split: dict, device, batch: int) -> float:
    was = student.training
    student.eval()
    correct = 0
    for i in range(0, len(split["labels"]), batch):
        x = torch.from_numpy(split["images"][i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        correct += (student(x).argmax(1).cpu() == torch.from_numpy(split["labels"][i:i + batch])).sum().item()
    student.train(was)
    return correct / max(1, len(split["labels"]))


def _epoch_of(line: str) -> int | float:
    """The epoch of a metrics.jsonl line; infinity for a line a full disk or a kill cut short (never kept)."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _digest(cfg: Config, kind: str) -> str:
    return cfg.digest("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train") + ":" + kind
