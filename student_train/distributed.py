"""Training under torchrun: one process group, rank 0 packs and writes, per-rank randomness.

`torchrun --nproc_per_node=N -m infra.cli train ...` starts N copies of `hakd train`. They share
one output directory, so exactly one of them (rank 0) may write in it: the packed FFCV file, the
summaries, checkpoints and metrics. The others wait for rank 0's packing at a collective and then
open the same file. A failure on rank 0 while packing reaches the other ranks as an error that
names rank 0, instead of leaving them blocked; a rank that dies later is torchrun's to report (it
stops the others), and every file is written whole or not at all (a temporary name, then
os.replace), so a killed run damages nothing and resumes from its last checkpoint.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from infra.errors import UserError

# Rank 0 packs a whole cache while the others wait in a collective: a full CIFAR-10 cache takes
# far longer than the default 10-30 minutes. A dead rank is caught by torchrun, not by this timeout.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=6)


class RankFailed(UserError, RuntimeError):
    """Another rank failed at a step this rank waits for; the message names the rank and its error."""


def world_size() -> int:
    """Processes in the job (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (torchrun's RANK; 0 without torchrun), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the shared outputs (rank 0, or the only process)."""
    return rank() == 0


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group once (NCCL on GPUs, else gloo); returns (rank, world size)."""
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            # before the group exists, so NCCL and every collective use this rank's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def check_launch(stages: list[str]) -> None:
    """Under torchrun only `hakd train` may run: the cache and the analysis are Ray jobs of their own."""
    if world_size() > 1 and stages != ["train"]:
        raise UserError(f"`hakd {' '.join(stages) if len(stages) == 1 else 'run'}` was started by torchrun "
                        f"(WORLD_SIZE={world_size()}); run it once without torchrun, and only "
                        f"`torchrun ... -m infra.cli train` under torchrun")


def on_rank0(fn, what: str):
    """Run `fn()` on rank 0 only and hand its result to every rank (a collective: the others wait).

    When fn fails on rank 0, rank 0 re-raises its own error and every other rank raises RankFailed
    with rank 0's message, so no rank is left waiting for a result that will never come.
    """
    rank_, world = init_distributed()
    if world == 1:
        return fn()
    box: list = [None]
    error = None
    if rank_ == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - every error must reach the waiting ranks
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RankFailed(f"rank 0 failed while {what}, so rank {rank_} stops too: {value}")
    return value


def pack_on_rank0(stores: dict[str, Path], out_dir: Path, workers: int, log=print) -> tuple[Path, dict]:
    """`pack` (verify the stores, write or reuse the FFCV file) on rank 0; every rank gets (path, meta)."""
    from student_train.pack import pack
    return on_rank0(lambda: pack(stores, out_dir, workers=workers, log=log), "packing the cache")


def epoch_seed(seed: int, rank_: int, epoch: int) -> int:
    """Seed of the torch RNGs (CPU and CUDA) for one rank's epoch.

    Everything random in an epoch (the PCA swap masks) is drawn after seeding with this, so the
    checkpoint's epoch number restores every RNG the next epoch uses (the view order is seeded by
    (seed, epoch) in student_train/loader.py): a resumed run reaches the same weights as an
    uninterrupted one, on CPU or GPU, and ranks draw different per-sample randomness.
    """
    return int(np.random.SeedSequence([seed, rank_, epoch, 0x5EED]).generate_state(1)[0])
