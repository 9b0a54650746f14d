"""Train your own student on a hakd cache: batches of replayed views, labels and teacher targets.

    data = open_run("runs/demo", device="cuda")           # a finished output (or OUT/train/data.beton)
    objective = data.objective("vit", student_channels=256, kd_lambda=1.0)
    for epoch in range(10):
        for batch in data.batches(epoch, batch_size=128, teacher="vit"):
            logits, feature = my_model(batch.images)        # feature: (B, C, H, W), any grid
            loss, terms = objective(logits, batch.labels, feature, batch.targets)

Every batch comes through the trainer's own code (`trainer.prepare_batch`): the packed file's rows in
the trainer's order, each image's cached view replayed on the device, and the teacher's cached output
decoded there (the ViT's cached block input through its frozen last block, `LastBlockTargets`), so a
loop written here learns from exactly what `hakd train`'s students learn from. docs/api.md describes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.config import TrainConfig
from infra.errors import UserError
from student_train.loader import StudentLoader
from student_train.losses import KDObjective
from student_train.pack import FFCV_NAME, META_NAME
from student_train.trainer import OBJECTIVE_KEYS, LastBlockTargets, prepare_batch, target_plan, teacher_sizes

# what `teacher=` names -> the trainer's student kind that learns from it
TEACHERS = {"vit": "student_kd_vit", "cnn": "student_kd_cnn", "logits": "student_logit_kd", None: "student_independent"}


class PackedCacheError(UserError, RuntimeError):
    """No whole packed cache where open_run looked; the message says how to make one."""


@dataclass
class KDBatch:
    """One batch, every tensor on the device of `open_run`.

    images:  float (B, 3, S, S) in [0, 1], each image under the view its teacher output was cached for
             (S = `input_size` of `batches`, the dataset's image size by default); not normalised.
    labels:  int64 (B,).
    targets: what `teacher=` asked for (KDObjective reads these keys):
             "vit"    -> q, k, v (B, heads, N, d) and h (B, N, D) of the ViT's last block, N = gh * gw patch tokens
             "cnn"    -> feature (B, C, H, W), the CNN teacher's hint map
             "logits" -> logits (B, classes), the ViT's
             None     -> {} (no teacher)
    index:   int64 (B,), each image's row in the training split.
    view:    float (B, 5), each image's view (y0, x0, h, w, flip: teacher_cache/views.py).
    """
    images: torch.Tensor
    labels: torch.Tensor
    targets: dict[str, torch.Tensor]
    index: torch.Tensor
    view: torch.Tensor


class Batches:
    """One epoch of `KDBatch`es; len() is the number of batches. Iterate one epoch at a time."""

    def __init__(self, loader: StudentLoader, plan: dict, live: LastBlockTargets | None, kind: str,
                 input_size: int, epoch: int, device: torch.device):
        self.loader, self.plan, self.live, self.kind = loader, plan, live, kind
        self.input_size, self.epoch, self.device = input_size, epoch, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        for raw in self.loader:
            x, labels, targets = prepare_batch(self.loader, raw, self.plan, self.live, self.kind, self.input_size,
                                               self.device)
            yield KDBatch(x, labels, targets, raw["index"].to(self.device), raw["view"].to(self.device))


class KDData:
    """A packed cache, opened: `batches` for the data, `objective` for the loss. Made by `open_run`.

    num_classes, image_size (the stored images' side), images (in the training split), views (cached per
    image), teachers (the teacher model names, by role)."""

    def __init__(self, beton: Path, meta: dict, device: str | torch.device = "cpu", seed: int = 0,
                 workers: int = 1, amp: bool = True):
        self.beton, self.meta = Path(beton), meta
        self.device = torch.device(device)
        self.seed, self.workers, self.amp = seed, workers, amp
        self.num_classes: int = meta["num_classes"]
        self.image_size: int = meta["image_size"]
        self.images: int = meta["images"]
        self.views: int = meta["views"]
        self.teachers: dict[str, str] = {role: ident["teacher"] for role, ident in meta["identities"].items()}
        self._live: LastBlockTargets | None = None
        self._loaders: dict[tuple, StudentLoader] = {}

    def __repr__(self) -> str:
        return (f"KDData({self.beton}, {self.images} images x {self.views} views, {self.num_classes} classes, "
                f"teachers {self.teachers}, device {self.device})")

    def _kind(self, teacher: str | None) -> str:
        if teacher not in TEACHERS:
            raise ValueError(f"teacher={teacher!r}; expected one of {', '.join(map(repr, TEACHERS))}")
        return TEACHERS[teacher]

    def live_block(self) -> LastBlockTargets:
        """The ViT teacher's frozen last block (cached block input (B, 1 + N, D) -> q, k, v, h), on the device."""
        if self._live is None:
            self._live = LastBlockTargets.from_pack(self.beton.parent, self.meta, self.amp).to(self.device)
        return self._live

    def batches(self, epoch: int, batch_size: int, teacher: str | None = "vit", input_size: int | None = None,
                shuffle: bool = True, drop_last: bool = True, views: int = 0) -> Batches:
        """One epoch of KDBatches (see KDBatch for the shapes).

        epoch:   picks which cached view each image contributes and the order (seeded, as the trainer's epochs).
        shuffle: False gives view 0 (the plain image) of every image in order, for evaluation.
        input_size: the side the views are resampled to; the dataset's image size by default.
        views:   draw from the first k cached views of each image only (train.views; 0: all of them)."""
        kind = self._kind(teacher)
        plan = target_plan(kind, self.meta)
        fields = [plan["field"]] if plan.get("field") else []
        key = (batch_size, tuple(fields), shuffle, drop_last, views)
        if key not in self._loaders:
            self._loaders[key] = StudentLoader(self.beton, self.meta, fields, batch_size, self.workers, self.seed,
                                               distributed=False, drop_last=drop_last, shuffle=shuffle, views=views)
        live = self.live_block() if kind == "student_kd_vit" else None
        return Batches(self._loaders[key], plan, live, kind, input_size or self.image_size, epoch, self.device)

    def teacher_sizes(self, teacher: str | None) -> dict:
        """The sizes a projector for `teacher` is built with: "vit" -> teacher_dim (D), num_heads and grid
        ((gh, gw) tokens); "cnn" -> teacher_channels (C); "logits" and None -> {}."""
        kind = self._kind(teacher)
        live = self.live_block() if kind == "student_kd_vit" else None
        return teacher_sizes(kind, self.meta, target_plan(kind, self.meta), live)

    def objective(self, teacher: str | None, student_channels: int | None = None, **kwargs) -> KDObjective:
        """The loss `hakd train` gives the student of this teacher, as a module on the device; its projectors
        learn, so give its parameters to your optimiser. forward(logits, labels, student_feature, batch.targets)
        -> (total, terms): "vit" CE + kd_lambda (PCA + GL), "cnn" CE + kd_lambda hint, "logits" Hinton KD,
        None CE. student_channels: C of your feature map ("vit", "cnn"). kwargs override KDObjective's
        arguments, which default to the train.* defaults (kd_lambda 1, gl_groups 4, temperature 4, ...)."""
        kind = self._kind(teacher)
        defaults = TrainConfig()
        kwargs = {"label_smoothing": defaults.label_smoothing,
                  **{arg: getattr(defaults, key) for key, arg in OBJECTIVE_KEYS[kind].items()}, **kwargs}
        return KDObjective(kind, student_channels=student_channels, **self.teacher_sizes(teacher),
                           **kwargs).to(self.device)


def open_run(path: str | Path, device: str | torch.device = "cpu", seed: int = 0, workers: int = 1,
             amp: bool = True) -> KDData:
    """Open the packed cache of a finished output: OUT (after `hakd train`), OUT/train, or OUT/train/data.beton
    (data.json beside it).

    seed: of the view order (which view of each image an epoch takes, and the order): `hakd train`'s trial of
    seed k uses seed k, so with the same batch size epoch e brings the rows that trial's epoch e brought.
    workers: FFCV decode threads. amp: the ViT's block under bf16 autocast on CUDA (train.amp)."""
    path = Path(path)
    candidates = [path] if path.suffix == ".beton" else [path / FFCV_NAME, path / "train" / FFCV_NAME]
    beton = next((c for c in candidates if c.is_file() and (c.parent / META_NAME).is_file()), None)
    if beton is None:
        raise PackedCacheError(f"no packed cache ({FFCV_NAME} and {META_NAME}) at {path}; give the --out of a finished "
                          f"`hakd train` (which packs it), its train/ folder, or the .beton file itself")
    meta = json.loads((beton.parent / META_NAME).read_text())
    if beton.stat().st_size != meta.get("beton_bytes"):
        raise PackedCacheError(f"{beton} is {beton.stat().st_size} bytes, its {META_NAME} records {meta.get('beton_bytes')}; "
                          f"re-run `hakd train` on that output to pack it again")
    return KDData(beton, meta, device, seed, workers, amp)
