"""A cache actor's writer processes, and the shared host buffers they read the teacher's outputs from.

Why processes: when zarr encoded the shards, it did each chunk's bookkeeping on one event-loop thread per
process, so writer threads shared one core of that work. Measured on 2 cores writing ViT-B/16 units
(194 MB each) into /dev/shm that way: two writer threads 622-664 MB/s, two writer processes 824-907 MB/s;
on an H200 the bare ViT-B/16 forward produces 3.2 GB/s of them, which only several processes could
encode and write. A writer now encodes its shard files itself (teacher_cache/shards.py), and where it
owns more than one core its threads encode a shard's chunks at once (Blosc releases the GIL).

No bytes are copied between processes: each buffer slot is one shared-memory file holding a whole
unit (images, labels, views and the teacher's outputs), registered with CUDA as pinned memory, so
the device copies each batch straight into it and a writer process maps the same pages. A slot
returns to the pool once its unit is durable. Each unit is written by exactly one process (its own
shards), as zarr requires.
"""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import heap

import numpy as np

from infra.exclusive import lock_dir, wait_until_unheld

ALIGN = 4096  # every array starts on its own page: aligned for the device copies and for numpy
SHM = "/dev/shm"  # where Linux keeps shared memory: a tmpfs, often small in containers (docker: 64 MB)
SHM_SHARE = 0.5  # at most this fraction of its free space goes to one actor's buffers

Spec = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape of a full slot, numpy dtype)


def _offsets(spec: Spec) -> tuple[dict[str, int], int]:
    offsets, end = {}, 0
    for name, (shape, dtype) in spec.items():
        offsets[name] = end
        end += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def _views(buf, spec: Spec) -> dict[str, np.ndarray]:
    offsets, _ = _offsets(spec)
    return {name: np.ndarray(shape, dtype, buffer=buf, offset=offsets[name]) for name, (shape, dtype) in spec.items()}


def slot_bytes(spec: Spec) -> int:
    return _offsets(spec)[1]


def shm_free() -> int:
    st = os.statvfs(SHM)
    return st.f_bavail * st.f_frsize


def node_cpus_per_gpu() -> int:
    """CPUs per GPU on this node: from Ray's view of the node inside an actor, else from this machine."""
    try:
        import ray
        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            res = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node)
            return int(res.get("CPU", 1) // max(1, res.get("GPU", 1)))
    except Exception:  # no Ray here, or a Ray without this node's record: this machine's own count
        pass
    import torch
    return len(os.sched_getaffinity(0)) // max(1, torch.cuda.device_count())


def writer_count(requested: int, spec: Spec, device: str) -> int:
    """How many writer processes an actor runs: `requested`, or with 0 (auto) its node's CPUs per GPU less
    one (the actor's own thread) on a GPU, one on CPU (there the teacher's forward is the slow part);
    auto stays within half of /dev/shm's free space (each writer holds a unit, plus the one being computed).
    Raises when the buffers cannot fit at all, naming the fix."""
    size, free = slot_bytes(spec), shm_free()
    fits = int(free * SHM_SHARE // size) - 1
    n = requested or max(1, min(node_cpus_per_gpu() - 1 if device == "cuda" else 1, fits))
    if (n + 1) * size > free:
        from infra.errors import UserError
        raise UserError(f"the cache's unit buffers need {(n + 1) * size / 2**30:.2f} GiB of shared memory "
                        f"({n + 1} units of {size / 2**20:.0f} MiB) but {SHM} has {free / 2**30:.2f} GiB free: "
                        f"lower cache.writers or cache.shard_size, or give the machine more shared memory "
                        f"(docker run --shm-size=...)")
    return n


class SharedSlots:
    """`count` unit-sized buffers in shared memory (pinned for CUDA copies with `pin`), handed out one at a time.

    Each is a multiprocessing `Arena`: a file in /dev/shm that is unlinked as soon as it is made and reaches
    the writer processes as a descriptor when they are spawned, so however the processes end (kill -9 of
    the actor, its cluster stopped) no buffer outlives them; named segments leaked exactly then."""

    def __init__(self, spec: Spec, count: int, pin: bool):
        _, size = _offsets(spec)
        self.spec = spec
        self.arenas = [heap.Arena(size) for _ in range(count)]
        self.arrays = [_views(a.buffer, spec) for a in self.arenas]
        self.pinned = []
        if pin:  # page-locked: asynchronous device-to-host copies land here directly
            import torch
            for a in self.arenas:
                ptr = np.frombuffer(a.buffer, np.uint8).ctypes.data
                err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
                if int(err) != 0:  # still correct unpinned, only the copies wait: say so, and go on
                    warnings.warn(f"cudaHostRegister of a {size >> 20} MiB cache buffer failed ({err}); its "
                                  f"device-to-host copies will not overlap compute (`hakd bench cache`: copy)")
                    break
                self.pinned.append(ptr)
        self.free: queue.Queue = queue.Queue()
        for i in range(count):
            self.free.put(i)

    def acquire(self) -> int:
        return self.free.get()  # blocks while every slot is being written: back-pressure on compute

    def release(self, i: int) -> None:
        self.free.put(i)

    def close(self) -> None:
        if self.pinned:
            import torch
            for ptr in self.pinned:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            self.pinned = []
        self.arrays = []  # the numpy views go first; the mappings and their files go with the last reference
        self.arenas = []


# ---------------------------------------------------------------------- the writer process side
_child: dict = {}


def _watch_parent(parent: int) -> None:
    """Exit when the actor that started this process is gone (a killed Ray actor leaves no one to stop us)."""
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(1)


def wait_for_other_writers(store_path: str, timeout_s: float = 60.0) -> None:
    """Return once no writer process holds the store: each holds a shared lock on its directory for its life,
    and those of a run killed with SIGKILL exit within seconds (with their actor). Raises after `timeout_s`.
    A local store only: flock does not reach other machines, and an object store has no such lock."""
    from infra.storage import is_url
    from teacher_cache.store import StoreError
    if not is_url(store_path) and not wait_until_unheld(store_path, timeout_s):
        raise StoreError(f"writer processes of another hakd cache still hold {store_path} after "
                         f"{timeout_s:.0f} s; wait for that run to end (or stop it), then re-run")


def _attach(store_path: str, arenas: list, spec: Spec, parent: int, board, threads: int) -> None:
    """Set up a writer process. A failure is kept and raised by its first write: an initializer's own
    exception would only break the pool, with the cause printed to the process's stderr."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _child["board"] = np.frombuffer(board.buffer, np.int64)
    # Blosc releases the GIL: threads encode a shard's chunks at once where the process owns several cores
    _child["encoders"] = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        from teacher_cache.store import CacheStore
        from infra.storage import is_url
        store = CacheStore.open(store_path)
        # held until this process exits, however it exits: see wait_for_other_writers
        lock = None if is_url(store_path) else lock_dir(store_path, fcntl.LOCK_SH)
        _child.update(store=store, lock=lock, arenas=arenas, arrays=[_views(a.buffer, spec) for a in arenas])
    except Exception as e:
        _child["error"] = e


def _ready(i: int, timeout_s: float) -> int:
    """Start-up task i: sign the board, then wait until every process has signed it. Each task thus holds
    its process until all have started, so no process takes two and every one is running when they end."""
    board = _child["board"]
    board[i] = os.getpid()
    deadline = time.monotonic() + timeout_s
    while not board.all() and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def _write(u: int, slot: int, rows: int) -> dict[str, float]:
    """Write unit u from slot `slot` (its first `rows` samples); returns the store's seconds by stage."""
    if "error" in _child:
        raise _child["error"]
    store = _child["store"]
    before = dict(store.seconds)
    store.write_unit(u, {name: a[:rows] for name, a in _child["arrays"][slot].items()}, check_finite=False,
                     pool=_child["encoders"])
    return {k: v - before.get(k, 0.0) for k, v in store.seconds.items()}


STARTUP_TIMEOUT_S = 120.0


class WriterPool:
    """`processes` writer processes over one store, reading units from `slots`, each encoding with `threads`
    threads (the CPUs the caller owns, shared out: one each where there are as many writers as cores)."""

    def __init__(self, store_path: str, slots: SharedSlots, processes: int, threads: int = 1):
        self.slots = slots
        self._board = heap.Arena(8 * processes)  # one pid per process that has started (zero-filled)
        self.pool = ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"), initializer=_attach,
                                        initargs=(store_path, slots.arenas, slots.spec, os.getpid(), self._board,
                                                  threads))
        self._closed = weakref.finalize(self, WriterPool._shutdown, self.pool, slots)
        # Every process starts now, not on demand: the executor spawns one per submit and hands queued tasks
        # to whichever has started, so the first units would wait for interpreters to start and import
        # (seconds under gVisor on the H200) and a benchmark's first timed run would pay for it. The start-up
        # tasks hold their processes until all have signed the board; a failed set-up is raised by the first
        # write, and one that cannot start at all leaves `pids` short after the timeout.
        try:
            futures = [self.pool.submit(_ready, i, STARTUP_TIMEOUT_S) for i in range(processes)]
            self.pids = sorted({f.result() for f in futures})
        except BrokenProcessPool:
            self.close()
            raise _died() from None

    def submit(self, u: int, slot: int, rows: int) -> Future:
        """Write unit u from `slot` in a writer process; the slot is released when the write has ended."""
        try:
            fut = self.pool.submit(_write, u, slot, rows)
        except BrokenProcessPool:
            self.slots.release(slot)
            raise _died() from None
        fut.add_done_callback(lambda _: self.slots.release(slot))
        return fut

    @staticmethod
    def result(fut: Future) -> dict[str, float]:
        try:
            return fut.result()
        except BrokenProcessPool:
            raise _died() from None

    def close(self) -> None:
        self._closed()

    @staticmethod
    def _shutdown(pool: ProcessPoolExecutor, slots: SharedSlots) -> None:
        pool.shutdown(wait=True, cancel_futures=True)
        slots.close()


def _died() -> RuntimeError:
    return RuntimeError("a cache writer process died (out of memory, or killed); the units it was writing are "
                        "not marked done: re-run `hakd cache` with the same config and --out to resume")
