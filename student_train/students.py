"""Student registry: torchvision ResNet-50 for the paper, a small ResNet for the demo.

A `Student` takes float images in [0, 1] at its input size, normalises them itself, and exposes
the stage the projectors read (`kd_layer`, ResNet `layer3`: 14x14 at 224 px for ResNet-50, the
ViT-B/16 token grid; 8x8 at 32 px for the demo net, the demo ViT's grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from teacher_cache.small_nets import SmallResNet
from teacher_cache.teachers import IMAGENET_MEAN, IMAGENET_STD

STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class StudentSpec:
    name: str
    build: Callable[[int], nn.Module]
    input_size: int | None        # None = the dataset's image size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kd_layer: str = "layer3"


def _resnet50(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50
    return resnet50(weights=None, num_classes=num_classes)


STUDENTS: dict[str, StudentSpec] = {s.name: s for s in [
    StudentSpec("resnet_demo", lambda c: SmallResNet(c), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    StudentSpec("resnet50", _resnet50, 224, IMAGENET_MEAN, IMAGENET_STD),
]}


class Student(nn.Module):
    def __init__(self, arch: str, num_classes: int, image_size: int):
        super().__init__()
        if arch not in STUDENTS:
            raise KeyError(f"unknown student architecture {arch!r}; registered: {', '.join(STUDENTS)}")
        self.spec = STUDENTS[arch]
        self.input_size = self.spec.input_size or image_size
        self.net = self.spec.build(num_classes)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))

    def forward_with(self, x: torch.Tensor, layers: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of the named stages, in one pass."""
        feats: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())
        hooks = [modules[l].register_forward_hook(lambda m, i, o, l=l: feats.__setitem__(l, o)) for l in layers]
        try:
            logits = self(x)
        finally:
            for h in hooks:
                h.remove()
        return logits, feats

    def channels(self, layer: str) -> int:
        with torch.no_grad():
            was = self.training
            self.eval()
            _, f = self.forward_with(torch.zeros(1, 3, self.input_size, self.input_size), (layer,))
            self.train(was)
        return f[layer].shape[1]
