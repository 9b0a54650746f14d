"""bench train: one student, one batch size, four ways of getting the teacher's signal, and what
each part of the KD step costs.

  plain_step_s        CE only (no teacher)
  resident_kd_step_s  CE + lambda (PCA + GL); the cached last-block input already in device memory,
                      the frozen last ViT block run on it each step (as the trainer does)
  offline_kd_step_s   the same KD step fed by the FFCV StudentLoader from the packed cache,
                      the wait for the next batch and the host-to-device copies included
  online_kd_step_s    the teacher run live each step: its forward up to the last block on the
                      view (stopped there), the live block, then the KD step

  compiled_kd_step_s  resident_kd_step_s with train.compile (GPU only: inductor takes minutes on CPU);
                      compiled_plain_step_s and compiled_offline_kd_step_s likewise, and their ratio
                      compiled_offline_over_plain: the trainer's GPU default (train.compile auto)
  breakdown_step_s    plain CE plus one addition at a time, teacher tensors resident (see ADDITIONS):
                      live_block, gl, pca_convs, pca_relations, pca (both), hint; with plain and
                      full_kd (= resident_kd_step_s); breakdown_over_plain divides each by plain

The keys above use train.pca_qkv (`pca_qkv`, the paper's conv3x3 by default). Every other PCA map of
QKV_MAPS gets its own full KD step and convolutions: breakdown_step_s `full_kd_<map>` and
`pca_convs_<map>`, and for every map `offline_kd_step_s_by_pca_qkv` and `offline_over_plain_by_pca_qkv`.
`gflop_per_image` is counted by torch's FlopCounterMode on one image: the student's forward and
each map's Q, K, V convolutions (forward; their backward costs about twice as much again).

Each step replays the view on the device as the trainer does (`apply_views`), under bf16 autocast
and channels_last on GPU. Every kind gets its own freshly initialised student and optimiser, and
all four run on the same number of torch threads (FFCV's Loader resets torch.set_num_threads to
its worker count at every epoch start; the offline step puts it back). After a warm-up the kinds
are timed in rounds, `train_steps` steps of each in turn, so that drift on the machine hits all four
alike; the medians over the rounds are reported.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from infra.bench.common import Context, header, judge, log, median, missing_modules, sig, timed
from student_train.losses import KDObjective
from student_train.projectors import QKV_MAPS, GLProjector, HintRegressor, PCAProjector, relation_losses
from student_train.students import Student
from student_train.trainer import LastBlockTargets
from teacher_cache.views import apply_views


class _Stop(Exception):
    pass


def tokens_before_last_block(teacher, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The teacher's residual stream entering its last block; the forward stops there."""
    out = {}

    def hook(module, inputs, output):
        out["t"] = output
        raise _Stop

    h = dict(teacher.net.named_modules())[layer].register_forward_hook(hook)
    try:
        teacher(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return out["t"]


class Setup:
    """The student pieces and a fixed device-resident batch (first B images, view 1)."""

    def __init__(self, ctx: Context):
        p, cfg = ctx.p, ctx.cfg
        self.p, self.device = p, p.device
        self.on_gpu = p.device == "cuda"
        store = ctx.filled_store("teacher_vit")
        self.layer = next(iter(store.layout.layers))
        self.num_classes = store.layout.num_classes
        self.live = LastBlockTargets(cfg.teacher_vit.name, self.num_classes, cfg.data.image_size,
                                     store.read_params("live_block"), p.amp).to(p.device)
        g, b = store.group, p.train_batch
        dev = p.device
        self.images = torch.from_numpy(g["images"][:b]).to(dev)
        self.labels = torch.from_numpy(g["labels"][:b]).to(dev)
        self.views = torch.from_numpy(g["views"][:b, 1]).to(dev)
        self.tokens = torch.from_numpy(g[f"features/{self.layer}"][:b, 1]).to(dev)  # float16, resident
        self.teacher_dim = self.tokens.shape[-1]
        self.image_size = cfg.data.image_size
        self.t = cfg.train

    def model(self, kind: str, pca_qkv: str | None = None):
        """Student, objective and optimiser; ``pca_qkv`` overrides train.pca_qkv."""
        torch.manual_seed(0)
        student = Student(self.p.student, self.num_classes, self.image_size)
        kw = dict(kind=kind, student_channels=student.channels(student.spec.kd_layer), kd_lambda=self.t.kd_lambda,
                  gl_groups=self.t.gl_groups, swap_prob=self.t.pca_swap_prob, pca_attn_weight=self.t.pca_attn_weight,
                  pca_value_weight=self.t.pca_value_weight, gl_weight=self.t.gl_weight,
                  pca_qkv=pca_qkv or self.t.pca_qkv)
        if kind == "student_kd_vit":
            kw.update(teacher_dim=self.teacher_dim, num_heads=self.live.heads, grid=self.live.grid)
        objective = KDObjective(**kw)
        student.to(self.device).train()
        objective.to(self.device).train()
        if self.on_gpu and self.p.channels_last:
            student.to(memory_format=torch.channels_last)
            objective.to(memory_format=torch.channels_last)
        params = list(student.parameters()) + list(objective.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return student, objective, opt

    def student_input(self, images, views, student):
        x = apply_views(images, views, student.input_size)
        return x.contiguous(memory_format=torch.channels_last) if self.on_gpu and self.p.channels_last else x

    def step(self, model, x, labels, teacher) -> None:
        student, objective, opt = model
        kd_layer = student.spec.kd_layer
        with torch.autocast("cuda", torch.bfloat16, enabled=self.on_gpu and self.p.amp):
            logits, feats = student.forward_with(x, (kd_layer,))
            total, _ = objective(logits, labels, feats[kd_layer] if teacher else None, teacher)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()


# The additions of the breakdown, each alone on top of the plain CE step. Teacher targets are computed
# once (resident) except for live_block, which runs the frozen last ViT block each step and nothing else.
ADDITIONS = ("live_block", "gl", "pca_convs", "pca_relations", "pca", "hint")


def addition_step(s: Setup, name: str, cnn_shape: tuple[int, ...], pca_qkv: str | None = None):
    """A step closure: plain CE plus the addition `name` (ADDITIONS), with its own student and optimiser;
    ``pca_qkv`` overrides train.pca_qkv for pca and pca_convs."""
    torch.manual_seed(0)
    student = Student(s.p.student, s.num_classes, s.image_size)
    kd_layer = student.spec.kd_layer
    channels, t = student.channels(kd_layer), s.t
    with torch.no_grad():
        target = s.live(s.tokens)
    heads, grid = s.live.heads, s.live.grid
    if name == "live_block":
        extra, loss_of = None, None
    elif name == "gl":
        extra = GLProjector(channels, s.teacher_dim, grid, t.gl_groups)
        loss_of = lambda f: extra(f, target["h"])  # noqa: E731
    elif name in ("pca", "pca_convs"):
        extra = PCAProjector(channels, s.teacher_dim, heads, t.pca_swap_prob, grid, qkv=pca_qkv or t.pca_qkv)
        if name == "pca":
            loss_of = lambda f: sum(extra(f, target["q"], target["k"], target["v"]))  # noqa: E731
        else:  # the three convolutions, with a loss as cheap as possible
            loss_of = lambda f: sum(m.float().square().mean() for m in extra.project(f, grid))  # noqa: E731
    elif name == "pca_relations":  # the N x N relations alone, on leaf tensors shaped like Q_S, K_S, V_S
        extra = nn.ParameterList([nn.Parameter(target[k].detach().float() + 0.1 * torch.randn_like(target[k]))
                                  for k in "qkv"])
        loss_of = lambda f: sum(relation_losses(*extra, target["q"], target["k"], target["v"]))  # noqa: E731
    elif name == "hint":
        extra = HintRegressor(channels, cnn_shape[0])
        hint_target = torch.randn(s.p.train_batch, *cnn_shape, device=s.device, dtype=torch.float16)
        loss_of = lambda f: extra(f, hint_target)  # noqa: E731
    else:
        raise ValueError(f"unknown addition {name!r}; expected one of {ADDITIONS}")
    modules = [student] + ([extra] if extra is not None else [])
    for m in modules:
        m.to(s.device).train()
        if s.on_gpu and s.p.channels_last:
            m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([q for m in modules for q in m.parameters()], lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def step():
        if name == "live_block":
            s.live(s.tokens)
        x = s.student_input(s.images, s.views, student)
        with torch.autocast("cuda", torch.bfloat16, enabled=s.on_gpu and s.p.amp):
            logits, feats = student.forward_with(x, (kd_layer,))
            total = F.cross_entropy(logits.float(), s.labels)
            if loss_of is not None:
                total = total + t.kd_lambda * loss_of(feats[kd_layer])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step


def step_time(fn, p, device) -> float:
    """Median seconds per step: warm-up steps, then `repeats` timed runs of `train_steps` steps."""
    for _ in range(p.train_warmup):
        fn()
    runs = []
    for _ in range(p.repeats):
        def many():
            for _ in range(p.train_steps):
                fn()
        runs.append(timed(many, device) / p.train_steps)
    return median(runs)


def epochs_of(loader):
    """Batches of the StudentLoader across epochs, as the trainer sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def resident_rate(ctx: Context) -> float:
    """Samples/s the student consumes with resident teacher tensors (for `bench loader` alone)."""
    s = Setup(ctx)
    m = s.model("student_kd_vit")
    step = step_time(lambda: s.step(m, s.student_input(s.images, s.views, m[0]), s.labels, s.live(s.tokens)),
                     ctx.p, ctx.p.device)
    return ctx.p.train_batch / step


def gflop_per_image(s: Setup) -> dict[str, float]:
    """Forward GFLOPs for one image, counted by torch: the student, and each PCA map's Q, K, V convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return sig(counter.get_total_flops() / 1e9)

    torch.manual_seed(0)
    student = Student(s.p.student, s.num_classes, s.image_size).to(s.device).eval()
    x = s.student_input(s.images[:1], s.views[:1], student)
    out = {"student_forward": count(lambda: student(x))}
    with torch.no_grad():
        feature = student.forward_with(x, (student.spec.kd_layer,))[1][student.spec.kd_layer]
    for qkv in QKV_MAPS:
        pca = PCAProjector(feature.shape[1], s.teacher_dim, s.live.heads, grid=s.live.grid, qkv=qkv).to(s.device)
        out[f"pca_{qkv}"] = count(lambda: pca.project(feature, s.live.grid))
    return out


def run(ctx: Context) -> dict:
    p, dev = ctx.p, ctx.p.device
    s = Setup(ctx)
    threads = ctx.threads
    configured = s.t.pca_qkv  # the PCA map of every key without a map's name in it
    others = [q for q in QKV_MAPS if q != configured]
    kinds = {}

    m_plain = s.model("student_independent")
    kinds["plain_step_s"] = lambda: s.step(m_plain, s.student_input(s.images, s.views, m_plain[0]), s.labels, None)

    def resident(model):
        return lambda: s.step(model, s.student_input(s.images, s.views, model[0]), s.labels, s.live(s.tokens))

    kinds["resident_kd_step_s"] = resident(s.model("student_kd_vit"))
    for q in others:
        kinds[f"resident_kd_{q}"] = resident(s.model("student_kd_vit", q))
    m_comp = live_comp = None
    if s.on_gpu:  # train.compile (the GPU default): student, projectors and live block compiled in place, as the trainer does
        m_comp_plain, m_comp, live_comp = s.model("student_independent"), s.model("student_kd_vit"), copy.deepcopy(s.live)
        for module in (m_comp_plain[0], m_comp[0], m_comp[1], live_comp):
            module.compile()
        kinds["compiled_plain_step_s"] = lambda: s.step(m_comp_plain, s.student_input(s.images, s.views, m_comp_plain[0]),
                                                        s.labels, None)
        kinds["compiled_kd_step_s"] = lambda: s.step(m_comp, s.student_input(s.images, s.views, m_comp[0]), s.labels,
                                                     live_comp(s.tokens))

    cnn_layout = ctx.store("teacher_cnn").layout
    cnn_shape = next(iter(cnn_layout.layers.values()))
    for name in ADDITIONS:
        kinds[f"plus_{name}"] = addition_step(s, name, cnn_shape)
    for q in others:
        kinds[f"plus_pca_convs_{q}"] = addition_step(s, "pca_convs", cnn_shape, q)

    # online: the teacher runs on every step (its forward stopped at the last block's input)
    teacher = ctx.teacher("teacher_vit").to(dev).eval()
    m_on = s.model("student_kd_vit")

    def online():
        with torch.no_grad():
            xt = apply_views(s.images, s.views, teacher.input_size)
            if s.on_gpu and p.channels_last:  # as CacheWorker feeds it
                xt = xt.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", torch.bfloat16, enabled=s.on_gpu and p.amp):
                tok = tokens_before_last_block(teacher, xt, s.layer)
            target = s.live(tok)
        s.step(m_on, s.student_input(s.images, s.views, m_on[0]), s.labels, target)
    kinds["online_kd_step_s"] = online

    # offline: the same KD step fed by the FFCV loader from the packed cache, once per PCA map (one loader)
    skipped = missing_modules(["ffcv"])
    batches, ahead = None, 0
    offline_kinds = {configured: "offline_kd_step_s", **{q: f"offline_kd_{q}" for q in others}}
    if skipped:
        log("train: offline KD skipped, ffcv is not importable")
    else:
        from student_train.loader import StudentLoader
        beton, meta, field = ctx.packed()
        loader = StudentLoader(beton, meta, [field], p.train_batch, p.loader_workers, seed=0,
                               timeout_s=ctx.cfg.train.loader_timeout_s)
        batches = epochs_of(loader)
        ahead = loader.loader.batches_ahead + 2

        def offline(model, live=s.live):
            def step():
                b = next(batches)
                # FFCV's Loader calls torch.set_num_threads(num_workers) on every epoch start; keep the
                # student on the same threads as the other kinds
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                images = b["image"].to(dev, non_blocking=True)
                labels = b["label"].to(dev, non_blocking=True)
                views = b["view"].to(dev, non_blocking=True)
                target = live(b[field].to(dev, non_blocking=True))
                s.step(model, s.student_input(images, views, model[0]), labels, target)
            return step
        for q, key in offline_kinds.items():
            kinds[key] = offline(s.model("student_kd_vit", q))
        if m_comp is not None:
            kinds["compiled_offline_kd_step_s"] = offline(m_comp, live_comp)

    def steps(fn, n):
        for _ in range(n):
            fn()

    # warm-up, then rounds over the kinds (drift on the machine hits all alike); before each timed
    # offline run, the batches the loader prepared while the other kinds ran are drained
    times = {k: [] for k in kinds}
    try:
        for k, fn in kinds.items():
            steps(fn, p.train_warmup)
        for _ in range(p.repeats):
            for k, fn in kinds.items():
                if k in offline_kinds.values() or k == "compiled_offline_kd_step_s":
                    steps(fn, ahead)
                times[k].append(timed(lambda: steps(fn, p.train_steps), dev) / p.train_steps)
    finally:
        if batches is not None:
            batches.close()
        torch.set_num_threads(threads)
        teacher.cpu()
    fig = {k: median(v) for k, v in times.items()}
    fig.setdefault("offline_kd_step_s", None)
    additions = {name: fig.pop(f"plus_{name}") for name in ADDITIONS}
    by_map = {}  # breakdown entries of the other PCA maps
    for q in others:
        by_map[f"pca_convs_{q}"] = fig.pop(f"plus_pca_convs_{q}")
        by_map[f"full_kd_{q}"] = fig.pop(f"resident_kd_{q}")
    offline_by_map = {q: fig.get(key) for q, key in offline_kinds.items()}
    for q in others:
        fig.pop(f"offline_kd_{q}", None)
    log("train: " + ", ".join(f"{k[:-7]} {v * 1e3:.1f} ms" for k, v in fig.items() if v is not None))
    breakdown = {"plain": fig["plain_step_s"], **additions, "full_kd": fig["resident_kd_step_s"], **by_map}
    log(f"train breakdown (plain +; pca_qkv {configured} unless named): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in breakdown.items()))
    flops = gflop_per_image(s)
    log("train GFLOP per image (forward): " + ", ".join(f"{k} {v}" for k, v in flops.items()))

    off = fig["offline_kd_step_s"]
    line = {**header("train", p), "student": p.student, "teacher": p.vit, "pca_qkv": configured,
            **{k: (sig(v) if v is not None else None) for k, v in fig.items()},
            "offline_over_resident": sig(off / fig["resident_kd_step_s"]) if off else None,
            "online_over_offline": sig(fig["online_kd_step_s"] / off) if off else None,
            "offline_over_plain": sig(off / fig["plain_step_s"]) if off else None,
            "compiled_over_resident": (sig(fig["compiled_kd_step_s"] / fig["resident_kd_step_s"])
                                       if "compiled_kd_step_s" in fig else None),
            # what the trainer runs on a GPU (train.compile auto): both steps compiled
            "compiled_offline_over_plain": (sig(fig["compiled_offline_kd_step_s"] / fig["compiled_plain_step_s"])
                                            if fig.get("compiled_offline_kd_step_s") else None),
            "student_samples_s": sig(p.train_batch / fig["resident_kd_step_s"]),
            "breakdown_step_s": {k: sig(v) for k, v in breakdown.items()},
            "breakdown_over_plain": {k: sig(v / breakdown["plain"]) for k, v in breakdown.items()},
            "offline_kd_step_s_by_pca_qkv": {q: sig(v) if v else None for q, v in offline_by_map.items()},
            "offline_over_plain_by_pca_qkv": {q: sig(v / fig["plain_step_s"]) if v else None
                                              for q, v in offline_by_map.items()},
            "gflop_per_image": flops,
            "params": {"batch": p.train_batch, "image_size": p.image_size, "kd": "PCA+GL (student_kd_vit)",
                       "amp_bf16": p.amp, "channels_last": p.channels_last, "warmup_steps": p.train_warmup,
                       "steps_per_repeat": p.train_steps, "repeats": p.repeats, "offline_drain_steps": ahead,
                       "loader_workers": p.loader_workers, "torch_threads": threads}}
    ctx.memo["student_samples_s"] = line["student_samples_s"]
    line["skipped"] = {}
    if skipped:
        line["skipped"]["offline_kd_step_s"] = "ffcv is not importable"
    if not s.on_gpu:
        for key in ("compiled_plain_step_s", "compiled_kd_step_s", "compiled_offline_kd_step_s"):
            line["skipped"][key] = "GPU only (inductor compiles for minutes on CPU)"
    real = p.vit == "vit_b16_clip" and p.student == "resnet50"
    targets = {"offline_over_resident": "<= 1.05" if p.device == "cuda" else "<= 1.15"}
    if real:
        targets["online_over_offline"] = ">= 2"
        targets["offline_over_plain"] = "<= 1.3"  # issue #10: distillation at the student's speed (eager)
        targets["compiled_offline_over_plain"] = "<= 1.3"  # the same with train.compile, the GPU default
        targets.update({f"offline_over_plain_by_pca_qkv.{q}": "<= 1.3" for q in QKV_MAPS})
    return judge(line, targets)
