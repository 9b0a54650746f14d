"""The teacher registry: what each teacher is, how to build it, where its weights come from.

A `Teacher` wraps a backbone with its preprocessing. It takes float images in [0, 1] at its
input size and either classifies them (`forward`) or returns the named intermediate outputs the
cache stores (`extract`). Layers are module names of the backbone (`blocks.10` = the output
tokens of ViT block 10, `layer3` = a ResNet stage), read with forward hooks, so any module can be
cached by name.

Default ViT layer: the residual stream entering the last block (`blocks.{depth-2}`). The trainer
runs that one block live (its weights are kept in the store) to get the last block's Q, K, V and
output tokens h_T: a quarter of the bytes that storing all four would take, for ~1/depth of the
teacher's compute (see docs/cache-format.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from infra.errors import UserError
from teacher_cache.small_nets import SmallResNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class WeightsMissing(UserError, FileNotFoundError):
    """The teacher's weights are neither in the given file nor in the hub cache."""


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    kind: str                                   # "vit" | "cnn"
    build: Callable[[int, int], nn.Module]      # (num_classes, input_size) -> backbone with a fresh head
    input_size: int | None                      # None = the dataset's image size (demo teachers)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    demo: bool                                  # small, trained end to end by the pipeline
    default_layers: Callable[[nn.Module], list[str]]
    head_prefix: str                            # state-dict prefix of the classifier head
    weights_hint: str = ""                      # where real weights are expected
    hub_files: tuple[str, ...] = field(default_factory=tuple)  # file names looked for in the hub caches
    hf_repo: str = ""                           # Hugging Face model id whose cached snapshots hold hub_files


def _vit_demo(num_classes: int, size: int) -> nn.Module:
    """timm ViT on an 8x8 token grid whose patchify conv is a small conv stem (Xiao et al. 2021): it learns
    the shapes from far fewer images; the tokens, blocks and everything the cache reads are unchanged."""
    from timm.models.vision_transformer import VisionTransformer
    patch = max(2, size // 8)
    net = VisionTransformer(img_size=size, patch_size=patch, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0,
                            num_classes=num_classes)
    net.patch_embed.proj = _conv_stem(patch, 96)
    return net


def _conv_stem(patch: int, dim: int) -> nn.Sequential:
    """3x3 conv-BN-ReLU layers with the patch's stride: stride 2 while the patch halves, one conv for
    what is left (an odd patch), then a 1x1 projection to the token width."""
    def conv(c_in, c_out, k, stride, pad):
        return [nn.Conv2d(c_in, c_out, k, stride, pad, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    layers, c = conv(3, 24, 3, 1, 1), 24
    while patch % 2 == 0:
        layers += conv(c, 2 * c, 3, 2, 1)
        c, patch = 2 * c, patch // 2
    if patch > 1:
        layers += conv(c, c, patch, patch, 0)
    return nn.Sequential(*layers, nn.Conv2d(c, dim, 1))


def _vit_b16_clip(num_classes: int, size: int) -> nn.Module:
    import timm
    return timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=num_classes,
                             img_size=size)


def _wrn101(num_classes: int, size: int) -> nn.Module:
    from torchvision.models import wide_resnet101_2
    net = wide_resnet101_2(weights=None)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _last_block_input(net: nn.Module) -> list[str]:
    return [f"blocks.{len(net.blocks) - 2}"]


TEACHERS: dict[str, TeacherSpec] = {s.name: s for s in [
    TeacherSpec("vit_demo", "vit", _vit_demo, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True,
                _last_block_input, "head."),
    TeacherSpec("wrn_demo", "cnn", lambda c, s: SmallResNet(c, widths=(24, 48, 96, 192)), None,
                (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, lambda net: ["layer3"], "fc."),
    TeacherSpec("vit_b16_clip", "vit", _vit_b16_clip, 224, CLIP_MEAN, CLIP_STD, False, _last_block_input, "head.",
                "timm vit_base_patch16_clip_224.openai: open_clip_pytorch_model.bin / model.safetensors from "
                "the Hugging Face hub (timm/vit_base_patch16_clip_224.openai)",
                ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"),
                "timm/vit_base_patch16_clip_224.openai"),
    TeacherSpec("wrn101", "cnn", _wrn101, 224, IMAGENET_MEAN, IMAGENET_STD, False, lambda net: ["layer3"], "fc.",
                "torchvision wide_resnet101_2 ImageNet weights (wide_resnet101_2-d733dc28.pth or -32ee1156.pth)",
                ("wide_resnet101_2-d733dc28.pth", "wide_resnet101_2-32ee1156.pth")),
]}


def get_spec(name: str) -> TeacherSpec:
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; registered: {', '.join(TEACHERS)}")
    return TEACHERS[name]


class Teacher(nn.Module):
    """A backbone plus its preprocessing; inputs are float images in [0, 1]."""

    def __init__(self, spec: TeacherSpec, num_classes: int, image_size: int):
        super().__init__()
        self.spec = spec
        self.input_size = spec.input_size or image_size
        self.net = spec.build(num_classes, self.input_size)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))

    def default_layers(self) -> list[str]:
        return self.spec.default_layers(self.net)

    def extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Logits and the outputs of the named modules for images `x` in [0, 1]."""
        modules = dict(self.net.named_modules())
        missing = [l for l in layers if l not in modules]
        if missing:
            raise KeyError(f"teacher {self.spec.name} has no layer {missing[0]!r}; "
                           f"examples: {', '.join(n for n in list(modules)[1:8])}")
        out: dict[str, torch.Tensor] = {}
        hooks = [modules[l].register_forward_hook(lambda m, i, o, l=l: out.__setitem__(l, o)) for l in layers]
        try:
            out["logits"] = self(x)
        finally:
            for h in hooks:
                h.remove()
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-head features, what a linear probe is fitted on."""
        net = self.net
        if self.spec.kind == "vit":
            return net.forward_head(net.forward_features(self.prepare(x)), pre_logits=True)
        head = net.fc
        feats = {}
        h = head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", i[0]))
        try:
            self(x)
        finally:
            h.remove()
        return feats["x"]

    def head(self) -> nn.Linear:
        return self.net.head if self.spec.kind == "vit" else self.net.fc


def _hf_snapshots(hf_cache: Path, repo: str) -> list[Path]:
    """The cached snapshots of Hugging Face model `repo`: the one refs/main names first, then newest first."""
    model = hf_cache / ("models--" + repo.replace("/", "--"))
    snapshots = sorted((model / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    main = model / "refs" / "main"
    if main.is_file():
        snapshots.sort(key=lambda p: p.name != main.read_text().strip())
    return snapshots


def find_weights(spec: TeacherSpec, weights: str | None) -> Path:
    """The local weights file: the configured one, else this teacher's own file in the hub caches.

    Only the teacher's own entries are looked at: torch hub's checkpoints/<file name> and, for a Hugging
    Face model, models--<org>--<name>/snapshots/<revision>/<file name>; never a same-named file of
    another model.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"teacher {spec.name}: weights file {path} does not exist")
        return path
    torch_hub = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints"
    hf_cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HF_HOME", "~/.cache/huggingface") + "/hub")).expanduser()
    folders = [torch_hub] + (_hf_snapshots(hf_cache, spec.hf_repo) if spec.hf_repo else [])
    for folder in folders:
        for name in spec.hub_files:
            if (folder / name).is_file():
                return folder / name
    places = [str(torch_hub)] + ([f"{hf_cache}/models--{spec.hf_repo.replace('/', '--')}/snapshots/<revision>"]
                                 if spec.hf_repo else [])
    raise WeightsMissing(
        f"teacher {spec.name}: no weights found. Provide {spec.weights_hint}: set teacher_*.weights to the local "
        f"file, or place it in {' or '.join(places)} (this machine cannot download).")


def load_backbone_weights(teacher: Teacher, path: Path) -> None:
    """Load pretrained backbone weights (untrusted file: tensors only); the head stays fresh."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if teacher.spec.kind == "vit":  # OpenAI/open_clip layouts -> timm names
        from timm.models.vision_transformer import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, teacher.net)
    prefix = teacher.spec.head_prefix
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    try:
        missing, unexpected = teacher.net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes (e.g. another width): torch raises even when not strict
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(f"teacher {teacher.spec.name}: weights file {path} does not fit the architecture "
                         f"({detail})") from None
    missing = [k for k in missing if not k.startswith(prefix)]
    if missing or unexpected:
        raise ValueError(f"teacher {teacher.spec.name}: weights file {path} does not fit the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
