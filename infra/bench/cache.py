"""bench cache: the cache path's images/s against the bare teacher forward on the same views.

The cache path is the real `CacheWorker` (in this process, no Ray): for each shard-aligned unit,
replay the views, run the teacher, bring the outputs to the host as float16, and hand the unit to
the writer thread (Blosc-compressed Zarr shards, fsynced, checksummed) while the next unit is
computed. The bare forward is the same loop with the same views, batch and precision, stopping at
the teacher's outputs on the device. "img/s" counts teacher inputs (image-views).
"""
from __future__ import annotations


from infra.bench.common import ROLES, Context, header, judge, log, median, sig, timed

TARGET = ">= 0.9"


def bare_unit(worker, u: int) -> None:
    """The teacher forward alone: CacheWorker's own loop without the host copy and the write."""
    for _ in worker.forward(u):
        pass


def one_teacher(ctx: Context, role: str) -> dict:
    p = ctx.p
    store = ctx.store(role)
    w = ctx.worker(role)
    units = list(range(store.layout.units))
    inputs = store.layout.n * store.layout.views

    def bare():
        for u in units:
            bare_unit(w, u)

    def cache():
        for u in units:
            w.process(u)
        w.drain()

    for _ in range(p.warmup):  # first calls: allocator, cuDNN/oneDNN choices, Blosc and Zarr set-up
        timed(lambda: bare_unit(w, 0), p.device)
        timed(lambda: (w.process(0), w.drain()), p.device)
    t_bare, t_cache = [], []
    for _ in range(p.repeats):  # alternate, so drift hits both alike
        t_bare.append(timed(bare, p.device))
        t_cache.append(timed(cache, p.device))
    bare_s, cache_s = inputs / median(t_bare), inputs / median(t_cache)
    bytes_per_input = sum(v for k, v in store.layout.bytes_per_sample().items()
                          if k.startswith("features/") or k == "logits") / store.layout.views
    log(f"cache {w.teacher.spec.name}: bare {bare_s:.0f} img/s, cache {cache_s:.0f} img/s")
    return {"teacher": w.teacher.spec.name, "bare_forward_img_s": sig(bare_s), "cache_img_s": sig(cache_s),
            "ratio": sig(cache_s / bare_s), "layers": list(store.layout.layers),
            "written_mb_s": sig(cache_s * bytes_per_input / 1e6)}


def run(ctx: Context) -> dict:
    rows = {}
    for role in ROLES:
        rows[role] = one_teacher(ctx, role)
        if role != "teacher_vit":
            ctx.release(role)  # the store is complete; the ViT teacher stays for `bench train`
    p = ctx.p
    first = rows["teacher_vit"]
    line = {**header("cache", p), "teacher": first["teacher"], "bare_forward_img_s": first["bare_forward_img_s"],
            "cache_img_s": first["cache_img_s"], "ratio": first["ratio"],
            "teachers": {r["teacher"]: {k: v for k, v in r.items() if k != "teacher"} for r in rows.values()},
            "params": {"images": p.n_images, "views": p.views, "image_size": p.image_size,
                       "batch": p.cache_batch, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                       "clevel": ctx.cfg.cache.clevel, "amp_bf16": p.device == "cuda",
                       "repeats": p.repeats, "unit": "teacher inputs (image-views) per second"}}
    return judge(line, {f"teachers.{r['teacher']}.ratio": TARGET for r in rows.values()})
