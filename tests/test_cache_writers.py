"""The cache's writer processes (teacher_cache/writers.py): the same store as writing in place, errors that
reach the actor, a dead writer reported and its unit left pending, and nothing left behind by a killed actor."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from teacher_cache.store import CacheStore, StoreError
from teacher_cache.writers import SharedSlots, WriterPool
from cache_helpers import IDENTITY, LAYOUT, PROVENANCE, assert_same_arrays, make_store, random_unit, snapshot

ROOT = Path(__file__).resolve().parents[1]


def fill(slots: SharedSlots, slot: int, arrays: dict[str, np.ndarray]) -> int:
    """Put one unit's arrays into a slot, as CacheWorker.compute does; returns its sample count."""
    for name, a in arrays.items():
        np.copyto(slots.arrays[slot][name][:len(a)], a.astype(slots.spec[name][1]))
    return len(arrays["labels"])


@pytest.mark.slow
def test_writer_processes_write_the_same_store(tmp_path):
    """Units written by writer processes from shared buffers = the same units written in this process."""
    _, want = make_store(tmp_path / "ref.zarr")
    path = tmp_path / "s.zarr"
    CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE, clevel=5)
    slots = SharedSlots(LAYOUT.unit_spec(), 3, pin=False)
    pool = WriterPool(str(path), slots, 2, threads=2)  # two processes, each encoding on two threads
    try:
        rng = np.random.default_rng(0)  # make_store's draws, unit by unit
        futures = []
        for u in range(LAYOUT.units):
            slot = slots.acquire()
            futures.append(pool.submit(u, slot, fill(slots, slot, random_unit(LAYOUT, u, rng))))
        stages = [pool.result(f) for f in futures]
    finally:
        pool.close()
    assert all(s["encode"] > 0 and s["write"] > 0 for s in stages)  # each write reports its stages' seconds
    store = CacheStore.open(path)
    assert store.verify() == [] and store.pending_units() == []
    got = {k: v for k, v in snapshot(path).items() if not k.startswith("units/")}
    assert_same_arrays(got, want)
    assert slots.arenas == []  # closed


@pytest.mark.slow
def test_every_writer_process_runs_before_the_first_unit(tmp_path):
    """The pool starts all its processes when it is built (the executor would spawn one per busy submit, so
    the first units would wait for interpreters to start, and a benchmark's first timed run with them)."""
    import psutil
    path = tmp_path / "s.zarr"
    CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE)
    slots = SharedSlots(LAYOUT.unit_spec(), 4, pin=False)
    pool = WriterPool(str(path), slots, 3)
    try:
        assert len(pool.pids) == 3
        children = {c.pid for c in psutil.Process().children(recursive=True)}
        assert set(pool.pids) <= children
    finally:
        pool.close()


def test_writer_error_reaches_the_caller(tmp_path):
    """A writer process that cannot open the store raises the store's own error at the first write."""
    slots = SharedSlots(LAYOUT.unit_spec(), 2, pin=False)
    pool = WriterPool(str(tmp_path / "missing.zarr"), slots, 1)
    try:
        with pytest.raises(StoreError, match="missing.zarr is not a hakd cache store"):
            pool.result(pool.submit(0, slots.acquire(), 16))
        assert slots.free.qsize() == 2  # the slot came back
    finally:
        pool.close()


@pytest.mark.slow
def test_a_shard_that_cannot_be_written_is_one_line_naming_the_fix(tmp_path, ray_session):
    """A file the writer cannot write (a full disk, or here a file where a folder should be) is a StoreError
    in the writer process, with the unit left pending; out of a Ray actor it is still that one line."""
    path = tmp_path / "s.zarr"
    store = CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE)
    (path / "features" / "layer3" / "c").write_bytes(b"in the way")
    slots = SharedSlots(LAYOUT.unit_spec(), 2, pin=False)
    pool = WriterPool(str(path), slots, 1)
    try:
        slot = slots.acquire()
        with pytest.raises(StoreError, match=r"cannot write unit 0 of cache store .*s\.zarr \(.*features/layer3/c.*"
                                             r"check that location .* re-run `hakd cache` with the same config"):
            pool.result(pool.submit(0, slot, fill(slots, slot, random_unit(LAYOUT, 0, np.random.default_rng(0)))))
    finally:
        pool.close()
    assert store.pending_units() == [0, 1, 2]

    import ray
    from teacher_cache.job import _from_actor

    @ray.remote
    def fail():
        raise StoreError("cannot write unit 3 of cache store /x (features/l/c/3/0/0: No space left on device); "
                         "free space there")
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(fail.remote())
    err = _from_actor(raised.value)
    assert type(err) is StoreError and str(err).startswith("cannot write unit 3") and "\n" not in str(err)


def test_dead_writer_is_reported_and_its_unit_stays_pending(tmp_path):
    path = tmp_path / "s.zarr"
    store = CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE)
    slots = SharedSlots(LAYOUT.unit_spec(), 2, pin=False)
    pool = WriterPool(str(path), slots, 1)
    rng = np.random.default_rng(1)
    try:
        slot = slots.acquire()
        pool.result(pool.submit(0, slot, fill(slots, slot, random_unit(LAYOUT, 0, rng))))
        for pid in list(pool.pool._processes):  # a writer killed, e.g. by the kernel's OOM killer
            os.kill(pid, signal.SIGKILL)
        slot = slots.acquire()
        with pytest.raises(RuntimeError, match="a cache writer process died .* re-run `hakd cache`"):
            pool.result(pool.submit(1, slot, fill(slots, slot, random_unit(LAYOUT, 1, rng))))
    finally:
        pool.close()
    assert store.pending_units() == [1, 2]


def test_a_new_run_waits_for_writers_still_holding_the_store(tmp_path):
    """Writers hold their store while they live; a new run waits for them (those of a killed run exit within
    seconds) and, if they stay, is refused instead of writing the same shards beside them."""
    from teacher_cache.writers import wait_for_other_writers
    path = tmp_path / "s.zarr"
    CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE)
    slots = SharedSlots(LAYOUT.unit_spec(), 2, pin=False)
    pool = WriterPool(str(path), slots, 1)
    try:
        slot = slots.acquire()
        pool.result(pool.submit(0, slot, fill(slots, slot, random_unit(LAYOUT, 0, np.random.default_rng(2)))))
        with pytest.raises(StoreError, match="writer processes of another hakd cache still hold .* wait for that run"):
            wait_for_other_writers(str(path), timeout_s=0.5)
    finally:
        pool.close()
    wait_for_other_writers(str(path), timeout_s=0.5)  # its writers are gone: no wait


ORPHAN = """
import sys, time, numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from teacher_cache.store import CacheStore
from teacher_cache.writers import SharedSlots, WriterPool
from cache_helpers import IDENTITY, LAYOUT, PROVENANCE
CacheStore.create_or_open({path!r}, LAYOUT, IDENTITY, PROVENANCE)
slots = SharedSlots(LAYOUT.unit_spec(), 3, pin=False)
pool = WriterPool({path!r}, slots, 2)
futures = [pool.submit(0, slots.acquire(), 16), pool.submit(1, slots.acquire(), 16)]  # both processes start
futures[0].result()
print(" ".join(map(str, pool.pool._processes)), flush=True)
time.sleep(600)
"""


def _ours_in_shm() -> set[Path]:
    return {f for f in Path("/dev/shm").iterdir() if f.name.startswith(("psm_", "pym-"))}


@pytest.mark.slow
def test_killed_actor_leaves_no_writer_process_or_shared_memory(tmp_path):
    """kill -9 of the process that owns the writers (a Ray actor killed): its writer processes exit, and no
    shared buffer is left in /dev/shm (unlinked files from the start), so nothing keeps writing into the
    store or holds memory."""
    before = _ours_in_shm()
    script = ORPHAN.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(tmp_path / "s.zarr"))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(w) for w in owner.stdout.readline().split()]
        assert len(pids) == 2
        assert _ours_in_shm() <= before  # nothing named there even while it runs
    finally:
        owner.kill()
        owner.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "writer processes outlived their owner"
    assert _ours_in_shm() <= before


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")  # a zombie (exited, not yet reaped by init) counts as gone
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_writer_count_auto_and_shared_memory_bound(monkeypatch):
    from infra.errors import UserError
    from teacher_cache import writers
    spec = LAYOUT.unit_spec()
    size = writers.slot_bytes(spec)
    monkeypatch.setattr(writers, "shm_free", lambda: 100 * size)
    monkeypatch.setattr(writers, "node_cpus_per_gpu", lambda: 16)
    assert writers.writer_count(3, spec, "cuda") == 3  # as asked
    assert writers.writer_count(0, spec, "cpu") == 1
    assert writers.writer_count(0, spec, "cuda") == 15  # the node's CPUs per GPU, less the actor's own
    monkeypatch.setattr(writers, "shm_free", lambda: 8 * size)
    assert writers.writer_count(0, spec, "cuda") == 3  # (3 + 1) units = half of /dev/shm's free space
    with pytest.raises(UserError, match=r"need .* GiB of shared memory .* lower cache.writers or cache.shard_size"):
        writers.writer_count(8, spec, "cuda")
