"""Small CIFAR-style ResNets for the embedded demo (teacher `wrn_demo`, student `resnet_demo`).

Built from torchvision's BasicBlock with a 3x3 stride-1 stem, so that at 32 px the stages are
32, 16, 8 and 4 pixels wide and `layer3` (8x8) matches the demo ViT's 8x8 token grid, as ResNet-50's
`layer3` (14x14) matches ViT-B/16's token grid at 224 px. Stage names follow torchvision
(`layer1`..`layer4`, `fc`) so that hooks, GradCAM targets and the hint layer are named alike.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != w):
                    down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, stride if j == 0 else 1, down))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes

    def forward_features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))
