"""2-process DDP on CPU (gloo) against the same training in one process, on the tiny packed cache.

The tiny cache and its packed file (tests/conftest.py: tiny_cache, tiny_packed) are written once for the session.
PAIR_BN is also the one-process reference of tests/test_torchrun.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infra.config import load_config
from infra.ray_cluster import free_port
from student_cache import K, N, OVERRIDES, TERMS, RecordStart, epoch_batches, make_cfg, metrics, quiet
from student_train.loader import StudentLoader, view_order
from student_train.students import STUDENTS, StudentSpec
from student_train.trainer import train_student
from teacher_cache.store import CacheStore

ROOT = Path(__file__).resolve().parents[1]
# numba's dispatcher finalizer raises a KeyError when FFCV's compiled pipelines are garbage collected
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


class PairBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm as two DDP ranks compute it, in one process: in training, the even and the odd
    positions of the batch are normalised separately (rank r holds positions r::2 of each global
    batch, see view_order), and the running statistics follow the even half only (DDP broadcasts
    rank 0's buffers before every forward, so rank 0's are the ones saved). Same state dict as BatchNorm2d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        pairs = x.unflatten(0, (-1, 2))
        even = F.batch_norm(pairs[:, 0], self.running_mean, self.running_var, self.weight, self.bias, True,
                            self.momentum, self.eps)
        odd = F.batch_norm(pairs[:, 1], None, None, self.weight, self.bias, True, 0.0, self.eps)
        return torch.stack([even, odd], 1).flatten(0, 1)


def _pair_bn_student(num_classes: int) -> nn.Module:
    from teacher_cache.small_nets import SmallResNet
    net = SmallResNet(num_classes)  # BatchNorm init draws no random numbers: same weights as resnet_demo
    for name, m in list(net.named_modules()):
        if type(m) is nn.BatchNorm2d:
            pbn = PairBatchNorm2d(m.num_features, m.eps, m.momentum)
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, pbn)
    return net


PAIR_BN = StudentSpec("resnet_demo_pairbn", _pair_bn_student, None, STUDENTS["resnet_demo"].mean,
                      STUDENTS["resnet_demo"].std)
DDP_COMMON = ["train.epochs=1", "train.batch_size=32", "train.pca_swap_prob=0.0"]
DDP_KINDS = ("student_independent", "student_kd_vit")


def ddp_worker(spec_path: str) -> None:
    """One rank of the DDP test (run in a subprocess with RANK / WORLD_SIZE / MASTER_* set)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    beton, meta = Path(spec["beton"]), spec["meta"]
    cfg = load_config(None, [*spec["overrides"], *DDP_COMMON])
    for kind in DDP_KINDS:
        train_student(cfg, kind, Path(spec["dir"]) / kind, beton, meta, log=quiet)
    rank = dist.get_rank()
    loader = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=cfg.seed, distributed=True)
    got = {e: epoch_batches(loader, e) for e in (0, 1)}
    torch.save({e: {"index": b["index"], "view": b["view"]} for e, b in got.items()},
               Path(spec["dir"]) / f"order{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ddp_two_cpu_ranks_match_one_process(tiny_cache, tiny_packed, tmp_path, monkeypatch):
    """2 gloo ranks x 16 images vs 1 process x 32 images, one epoch (2 optimiser steps), the real demo student.

    Each rank's BatchNorm normalises its own 16 images (SyncBatchNorm refuses CPU tensors in torch 2.14),
    so the 1-process reference uses PairBatchNorm2d, which computes exactly that in one process. The rest
    (the averaged gradients of student and projectors, the loss) is then the same computation up to float
    summation order: weights, running statistics and logged loss terms within 1e-5. Plain BatchNorm over
    all 32 images gives visibly different weights (checked, so the comparison can fail).
    """
    import student_train.trainer as trainer
    cfg, _ = tiny_cache
    beton, meta = tiny_packed
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"beton": str(beton), "meta": meta, "overrides": OVERRIDES,
                                "dir": str(tmp_path / "ddp")}))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
        code = f"import test_student_ddp as t; t.ddp_worker({str(spec)!r})"
        with (tmp_path / f"rank{rank}.log").open("w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))

    try:  # meanwhile, the 1-process references: per-half BatchNorm (the comparison), plain BatchNorm (the control)
        monkeypatch.setitem(STUDENTS, PAIR_BN.name, PAIR_BN)
        ref = tmp_path / "ref"
        start = RecordStart(trainer._run_epoch)
        for kind in DDP_KINDS:
            train_student(make_cfg(*DDP_COMMON, f"train.arch={PAIR_BN.name}"), kind, ref / kind, beton, meta,
                          log=quiet)
        with monkeypatch.context() as mp:
            mp.setattr(trainer, "_run_epoch", start)
            train_student(make_cfg(*DDP_COMMON), "student_independent", ref / "plain_bn", beton, meta, log=quiet)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs

    # each rank read positions r::2 of the 1-process order: disjoint halves covering every image
    views = CacheStore.open(meta["stores"]["teacher_vit"]).group["views"][:]
    orders = [torch.load(tmp_path / "ddp" / f"order{r}.pt", weights_only=True) for r in range(2)]
    for e in (0, 1):
        full = view_order(N, K, cfg.seed, e)
        for r in range(2):
            rows = full[r::2]
            assert np.array_equal(orders[r][e]["index"].numpy(), rows // K)
            assert np.array_equal(orders[r][e]["view"].numpy(), views[rows // K, rows % K])
        assert set(orders[0][e]["index"].tolist()).isdisjoint(orders[1][e]["index"].tolist())

    def load(d):
        return torch.load(d / "checkpoint.pt", weights_only=True)["model"], metrics(d)[0]

    def worst(a, b):
        assert a.keys() == b.keys()
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

    for kind in DDP_KINDS:
        (wd, md), (wr, mr) = load(tmp_path / "ddp" / kind), load(ref / kind)
        assert worst(wd, wr) <= 1e-5, (kind, worst(wd, wr))   # student, projectors and BN statistics
        for t in TERMS[kind] | {"loss"}:
            assert md[t] == pytest.approx(mr[t], rel=1e-5, abs=1e-6), (kind, t)
        assert md["train_accuracy"] == mr["train_accuracy"]

    # control: plain BatchNorm over 32 images moves the weights differently (~40 % of the update)
    wd, _ = load(tmp_path / "ddp" / "student_independent")
    wp, _ = load(ref / "plain_bn")
    w0 = start.initial
    keys = [k for k, v in w0.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    update = torch.cat([(wp[k] - w0[k]).flatten() for k in keys])
    gap = torch.cat([(wd[k] - wp[k]).flatten() for k in keys])
    assert update.norm() > 0 and gap.norm() > 0.1 * update.norm() and gap.abs().max() > 1e-3
