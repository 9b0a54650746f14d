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

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] = ()):
        """Logits; with ``layers`` (stage names), (logits, {stage: output}) from the same pass.

        The ResNet stages are called in turn rather than read by forward hooks: adding and removing
        hooks on every call would split a torch.compile graph (train.compile) in two."""
        unknown = set(layers) - set(STAGES)
        if unknown:
            raise KeyError(f"unknown stage(s) {sorted(unknown)}; a student exposes {', '.join(STAGES)}")
        net = self.net
        h = net.relu(net.bn1(net.conv1(self.prepare(x))))
        if hasattr(net, "maxpool"):  # torchvision's ResNet; the small CIFAR-style one has none
            h = net.maxpool(h)
        feats = {}
        for stage in STAGES:
            h = getattr(net, stage)(h)
            if stage in layers:
                feats[stage] = h
        logits = net.fc(torch.flatten(net.avgpool(h), 1))
        return (logits, feats) if layers else logits

    def forward_with(self, x: torch.Tensor, layers: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of the named stages, in one pass (through ``__call__``, so a
        compiled student, ``Student.compile()``, runs compiled here too)."""
        if not layers:
            raise ValueError("forward_with needs at least one stage name")
        return self(x, layers)

    def channels(self, layer: str) -> int:
        with torch.no_grad():
            was = self.training
            self.eval()
            _, f = self.forward_with(torch.zeros(1, 3, self.input_size, self.input_size), (layer,))
            self.train(was)
        return f[layer].shape[1]
