"""Training objectives of the four student kinds, built from the projectors.

``KDObjective(kind, ...)`` owns the projectors its kind needs (so the trainer puts its
parameters in the optimiser) and turns one batch into a total loss and its named terms:

    student_independent  total = CE
    student_logit_kd     total = (1 - alpha) CE + alpha KD_T       (Hinton et al. 2015)
    student_kd_vit       total = CE + kd_lambda (w_attn L_attn + w_value L_value + w_gl L_GL)
                         (Liu et al. 2022; L_PCA = L_attn + L_value, the weights are ours)
    student_kd_cnn       total = CE + kd_lambda L_hint              (Romero et al. 2015, FitNets)

All terms are float32 whatever the precision of the logits or teacher tensors.
``gradient_shares`` measures what each weighted KD term contributes to the gradient at the KD layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_train.projectors import GLProjector, HintRegressor, PCAProjector

KINDS = ("student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd")

# Constructor arguments each kind cannot do without.
_REQUIRED = {
    "student_kd_vit": ("student_channels", "kd_lambda", "teacher_dim", "num_heads", "grid"),
    "student_kd_cnn": ("student_channels", "kd_lambda", "teacher_channels"),
    "student_independent": (),
    "student_logit_kd": (),
}

# Keys each kind reads from the ``teacher`` dict.
_TEACHER_KEYS = {
    "student_kd_vit": ("q", "k", "v", "h"),
    "student_kd_cnn": ("feature",),
    "student_independent": (),
    "student_logit_kd": ("logits",),
}


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones as T
    changes (Hinton et al. 2015, section 2), so a fixed mixing weight stays meaningful.
    """
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDObjective(nn.Module):
    """The loss of one student kind; ``forward`` returns (total, terms).

    ``terms`` holds "ce" and the kind's own terms, unweighted: "pca_attn", "pca_value" and "gl"
    (kd_vit), "hint" (kd_cnn), "logit_kd" (logit_kd); ``contributions(terms)`` weights them as
    they enter the total. Arguments a kind needs (see ``_REQUIRED``) must be given, otherwise
    ``ValueError`` names the first one missing; the rest are ignored.

    - ``label_smoothing`` applies to the cross-entropy of every kind.
    - kd_vit: ``teacher_dim`` = D, ``num_heads``, ``grid`` = the teacher's (gh, gw),
      ``gl_groups``, ``swap_prob`` and ``pca_qkv`` (the PCA projector's Q, K, V map, one of
      ``projectors.QKV_MAPS``) configure the projectors; ``pca_attn_weight``,
      ``pca_value_weight`` and ``gl_weight`` weight the three terms inside kd_lambda (1, 1, 1 is
      the paper's unweighted L_PCA + L_GL).
    - kd_cnn: ``teacher_channels`` = C_T of the teacher's stage map.
    - logit_kd: ``temperature`` T and ``alpha``, the weight of the KD term. alpha = 0.9 puts
      most of the weight on the teacher's soft targets and keeps a tenth on the labels: the
      KD baseline of CRD/RepDistiller (Tian et al. 2020: CE weight 0.1, KD weight 0.9, T = 4).
    """

    def __init__(
        self,
        kind: str,
        student_channels: int | None = None,
        kd_lambda: float | None = None,
        label_smoothing: float = 0.0,
        teacher_dim: int | None = None,
        num_heads: int | None = None,
        grid: tuple[int, int] | None = None,
        gl_groups: int = 4,
        swap_prob: float = 0.5,
        teacher_channels: int | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        pca_attn_weight: float = 1.0,
        pca_value_weight: float = 1.0,
        gl_weight: float = 1.0,
        pca_qkv: str = "conv3x3",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        given = {
            "student_channels": student_channels,
            "kd_lambda": kd_lambda,
            "teacher_dim": teacher_dim,
            "num_heads": num_heads,
            "grid": grid,
            "teacher_channels": teacher_channels,
        }
        for name in _REQUIRED[kind]:
            if given[name] is None:
                raise ValueError(f"{kind} needs {name}")
        self.kind = kind
        self.kd_lambda = kd_lambda
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self.alpha = alpha
        self.weights = {"pca_attn": pca_attn_weight, "pca_value": pca_value_weight, "gl": gl_weight}
        if kind == "student_kd_vit":
            grid = (int(grid[0]), int(grid[1]))
            self.pca = PCAProjector(student_channels, teacher_dim, num_heads, swap_prob, grid=grid, qkv=pca_qkv)
            self.gl = GLProjector(student_channels, teacher_dim, grid, gl_groups)
        elif kind == "student_kd_cnn":
            self.hint = HintRegressor(student_channels, teacher_channels)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        student_feature: Tensor | None,
        teacher: dict[str, Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """student_logits (B, classes), labels (B,), student_feature (B, C_S, H_S, W_S) or None
        for kinds without features, teacher: the kind's keys (see ``_TEACHER_KEYS``) or None."""
        teacher = teacher or {}
        missing = [key for key in _TEACHER_KEYS[self.kind] if key not in teacher]
        if missing:
            raise ValueError(f"{self.kind} needs teacher keys {missing}")
        terms = {"ce": F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)}

        if self.kind == "student_logit_kd":
            terms["logit_kd"] = logit_kd_loss(student_logits, teacher["logits"], self.temperature)
        elif self.kind == "student_kd_vit":
            terms["pca_attn"], terms["pca_value"] = self.pca(student_feature, teacher["q"], teacher["k"], teacher["v"])
            terms["gl"] = self.gl(student_feature, teacher["h"])
        elif self.kind == "student_kd_cnn":
            terms["hint"] = self.hint(student_feature, teacher["feature"])
        return sum(self.contributions(terms).values()), terms

    def contributions(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each term as it enters the total (weighted); the total is their sum."""
        if self.kind == "student_logit_kd":
            return {"ce": (1.0 - self.alpha) * terms["ce"], "logit_kd": self.alpha * terms["logit_kd"]}
        return {name: value if name == "ce" else self.kd_lambda * self.weights.get(name, 1.0) * value
                for name, value in terms.items()}


def gradient_shares(contributions: dict[str, Tensor], feature: Tensor) -> dict[str, dict[str, Tensor]]:
    """Each KD term's gradient norm at ``feature`` (the student's KD-layer map) and its share.

    share_i = ||d c_i / d feature|| / sum_j ||d c_j / d feature|| over the KD terms of
    ``contributions`` (``KDObjective.contributions``), so the shares sum to 1 and say how much of the
    distillation signal reaching the KD layer each term carries. CE is left out: it reaches the KD
    layer only through the rest of the student, and a compiled student returns the feature and the
    logits from one graph, whose gradient cannot be taken apart there. One partial backward per term
    (the graph is kept for the step's own backward): call it on a few steps only. Returns device
    tensors {"grad_norm": {term: ...}, "grad_share": {term: ...}}; nothing synchronises the host.
    """
    norms = {}
    for name, c in contributions.items():
        if name == "ce":
            continue
        (grad,) = torch.autograd.grad(c, feature, retain_graph=True, allow_unused=True)
        norms[name] = grad.float().norm() if grad is not None else feature.new_zeros((), dtype=torch.float32)
    total = torch.stack(list(norms.values())).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return {"grad_norm": norms, "grad_share": {name: n / total for name, n in norms.items()}}
