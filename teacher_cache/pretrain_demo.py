"""Pretrain the demo ViT teacher on shape-only data: the embedded stand-in for a pretrained CLIP ViT.

The paper distils a CLIP ViT-B/16 whose features are global and shape-based into a CNN. Trained by
the pipeline on the demo's shortcut data (texture matches class 85% of the time), the small
`vit_demo` takes the texture shortcut instead. So it is pretrained once, here, on generated shapes
whose fill and background textures are drawn independently of the class: only the shape predicts
the label. Every epoch draws fresh images (seeds disjoint from the demo's own splits) and random
resized crops + flips (the cache's view augmentation), and the result is deterministic in the
arguments. The weights ship with hakd (`weights/vit_demo_shape.safetensors`; its sha256 is recorded
in `teacher_cache/embedded.py` and checked at every load).

    python -m teacher_cache.pretrain_demo --out teacher_cache/weights/vit_demo_shape.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from teacher_cache.embedded import sha256_file
from teacher_cache.shapes import SHAPES, make_shapes

# Data seeds: the demo's splits draw from rng([data.seed, 0..2]) with a small data.seed; these are far apart.
DATA_SEED_BASE = 1_000_000
EVAL_SEED = 999_999


def _batches(epoch: int, n: int, size: int, batch: int, seed: int):
    """Fresh shape-only images for one epoch, augmented by random resized crops and flips, in batches."""
    from teacher_cache.views import apply_views, sample_views
    d = make_shapes(n, size, seed=DATA_SEED_BASE + seed * 1000 + epoch, variant="train", texture_correlation=0.0)
    views = torch.from_numpy(sample_views(n, 2, DATA_SEED_BASE + seed * 1000 + epoch, (0.35, 1.0))[:, 1])
    images, labels = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"])
    for i in range(0, n - batch + 1, batch):  # full batches only: every step sees the same batch size
        yield apply_views(images[i:i + batch], views[i:i + batch], size), labels[i:i + batch]


@torch.no_grad()
def _measure(teacher, size: int, n: int) -> dict:
    """Clean accuracy on held-out shape-only images, and shape bias on the demo's cue-conflict variant."""
    from teacher_cache.bias import shape_bias
    from teacher_cache.fit import evaluate
    teacher.eval()
    held_out = make_shapes(n, size, seed=EVAL_SEED, variant="clean", texture_correlation=0.0)
    conflict = make_shapes(n, size, seed=EVAL_SEED, variant="texture")
    x = torch.from_numpy(conflict["images"]).permute(0, 3, 1, 2).float() / 255
    bias = shape_bias(teacher, x, torch.from_numpy(conflict["labels"]), torch.from_numpy(conflict["texture_labels"]))
    return {"shape_only_accuracy": evaluate(teacher, held_out["images"], held_out["labels"]),
            "cue_conflict_shape_bias": bias["shape_bias"],
            "cue_conflict_shape_accuracy": bias["shape_decisions"] / max(1, bias["n"])}


def pretrain(epochs: int, images_per_epoch: int, seed: int = 0, size: int = 32, batch: int = 128,
             lr: float = 1e-3, eval_images: int = 500, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Train `vit_demo` from scratch on shape-only data; returns (its state dict, measured summary)."""
    from teacher_cache.teachers import Teacher, get_spec
    torch.manual_seed(seed)
    teacher = Teacher(get_spec("vit_demo"), len(SHAPES), size)
    steps = epochs * (images_per_epoch // batch)
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    start = time.time()
    for epoch in range(epochs):
        teacher.train()
        losses = []
        for x, y in _batches(epoch, images_per_epoch, size, batch, seed):
            loss = F.cross_entropy(teacher(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        line = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "seconds": round(time.time() - start, 1)}
        if epoch % 5 == 4 or epoch == epochs - 1:
            line.update(_measure(teacher, size, eval_images))
        log(json.dumps(line))
    teacher.eval()
    summary = {"epochs": epochs, "images_per_epoch": images_per_epoch, "seed": seed, "size": size, "batch": batch,
               "lr": lr, **_measure(teacher, size, eval_images), "seconds": round(time.time() - start, 1)}
    return {k: v.contiguous() for k, v in teacher.net.state_dict().items()}, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--epochs", type=int, default=45)
    p.add_argument("--images-per-epoch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-images", type=int, default=500, help="held-out images behind the logged measures")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: deterministic and fastest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file
    state, summary = pretrain(args.epochs, args.images_per_epoch, args.seed, batch=args.batch, lr=args.lr,
                              eval_images=args.eval_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the file's bytes (and so its sha256) depend on the arguments only: timings stay out of it, and the
    # summary is one JSON string because safetensors writes several metadata keys in a random order
    recorded = {k: v for k, v in summary.items() if k != "seconds"}
    save_file(state, str(out), metadata={"pretrain_demo": json.dumps(recorded, sort_keys=True)})
    summary["sha256"] = sha256_file(out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
