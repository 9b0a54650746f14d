"""The user API (student_train/api.py) and its example script, against a finished tiny output.

The batches are checked against the cache stores read directly (not through the packed file or the
loader): each row's image under its view, its label, and its teacher targets recomputed from the stored
features; their order against the trainer's for the same seed and epoch; and the objective against the
one a trained trial saved in its checkpoint.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from student_train import PackedCacheError, open_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_own_loop.py"
# the arrays the demo students learn from: the ViT's last block input (3 blocks) and the CNN's layer3 map
STORED = {"vit": ("teacher_vit", "features/blocks.2"), "cnn": ("teacher_cnn", "features/layer3"),
          "logits": ("teacher_vit", "logits")}
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_open_run_names_what_is_missing(tmp_path):
    with pytest.raises(PackedCacheError, match="hakd train"):
        open_run(tmp_path)


def from_stores(data, batch, teacher: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's images, labels and targets recomputed from the Zarr stores the packed file was made from."""
    from student_train.trainer import LastBlockTargets
    from teacher_cache.store import CacheStore
    from teacher_cache.views import apply_views

    role, array = STORED[teacher]
    store = CacheStore.open(data.meta["stores"][role])
    g = store.group
    index = batch.index.cpu().numpy()
    views = g["views"][:][index]  # (B, K, 5): every cached view of each row's image
    match = (views == batch.view.cpu().numpy()[:, None, :]).all(-1)
    assert (match.sum(1) == 1).all(), "each row's view is one of its image's cached views"
    k = match.argmax(1)
    rows = np.arange(len(index))
    images = apply_views(torch.from_numpy(g["images"][:][index]), torch.from_numpy(views[rows, k]), data.image_size)
    labels = torch.from_numpy(g["labels"][:][index])
    stored = g[array]
    assert stored.dtype == np.float16, "the tiny config caches float16, compared as stored here"
    cached = torch.from_numpy(stored[:][index, k])
    if teacher == "logits":
        return images, labels, {"logits": cached}
    if teacher == "cnn":
        return images, labels, {"feature": cached}
    live = LastBlockTargets(data.teachers[role], data.num_classes, data.image_size, store.read_params("live_block"))
    return images, labels, live(cached)


def check_batches(out: Path) -> None:
    """The API's batches, for each teacher, against the stores and against the trainer's order."""
    from student_train.loader import view_order

    data = open_run(out)  # the tiny run's only trial trained with seed 0, batch 32
    assert (data.num_classes, data.image_size, data.images, data.views) == (10, 32, 128, 3)
    for teacher in ("vit", "cnn", "logits"):
        epoch = 1
        batches = data.batches(epoch, batch_size=32, teacher=teacher)
        got = list(batches)
        assert len(got) == len(batches) == 4
        rows = view_order(data.images, data.views, 0, epoch)  # the trainer's rows for seed 0, epoch 1
        assert np.array_equal(torch.cat([b.index for b in got]).numpy(), rows[:128] // data.views)
        assert not (torch.cat([b.view for b in got])[:, 2] == 1).all(), "real crops among the views"
        for b in got[:2]:
            images, labels, targets = from_stores(data, b, teacher)
            assert b.images.shape == (32, 3, 32, 32) and b.images.dtype == torch.float32
            torch.testing.assert_close(b.images, images, rtol=0, atol=1e-6)
            assert torch.equal(b.labels, labels)
            assert set(b.targets) == set(targets)
            for key, want in targets.items():
                torch.testing.assert_close(b.targets[key].float(), want.float(), rtol=1e-4, atol=1e-4, msg=key)
        if teacher == "vit":
            q, h = got[0].targets["q"], got[0].targets["h"]
            assert q.shape[:3] == (32, 3, 64) and h.shape == (32, 64, 96)  # (B, heads, N, d), (B, N, D)


def check_objective(out: Path) -> None:
    """data.objective builds the loss the trainer built: the trained trial's projector weights load into it."""
    from student_train.students import Student

    data = open_run(out)
    channels = Student("resnet_demo", data.num_classes, data.image_size).channels("layer3")
    for teacher, student in (("vit", "student_kd_vit"), ("cnn", "student_kd_cnn")):
        ck = torch.load(out / "train" / student / "seed0" / "checkpoint.pt", map_location="cpu", weights_only=True)
        saved = {k[len("objective."):]: v for k, v in ck["model"].items() if k.startswith("objective.")}
        objective = data.objective(teacher, student_channels=channels)
        objective.load_state_dict(saved)  # strict: the same projectors with the same shapes
        assert saved


@pytest.mark.slow
def test_batches_come_from_the_cache(tiny_run):
    check_batches(tiny_run)
    check_objective(tiny_run)


@pytest.mark.slow
def test_example_trains_from_a_finished_output(tiny_run, tmp_path):
    steps = 3
    run = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tiny_run), "--steps", str(steps)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+ \(epoch \d+\): loss (\S+) =", run.stdout, re.MULTILINE)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), run.stdout
    assert "pca_attn" in run.stdout and "gl" in run.stdout
