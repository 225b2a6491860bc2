"""Pre-activation ResNet-18 (He et al. 2016) as used by the CFA / FAIR-TAT / FRL code.

3x3 stem conv (64 channels, no BN after it), four stages of two PreActBlocks
(BN-ReLU-conv-BN-ReLU-conv, 1x1 conv shortcut without BN when the shape changes), final
BN + ReLU, ``avg_pool2d(out, 4)``, flatten, Linear.  Same head-size rule as ``resnet18``:
Linear input ``512 * (H/32) * (W/32)`` (512 for 32x32, 2048 for 64x64), and a global average
pool to 1x1 when the final map is smaller than 4x4 (e.g. 8x8 digits).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairbench.models.base import register_model
from fairbench.models.resnet import make_head, make_stages, pool_head


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(PreActBlock, num_blocks)
        self.bn = nn.BatchNorm2d(512 * PreActBlock.expansion)
        self.linear, self.global_pool = make_head(image_shape, 512 * PreActBlock.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(pool_head(out, self.global_pool))


@register_model("preact_resnet18", "Pre-activation ResNet-18 (CFA/FAIR-TAT/FRL), avg_pool 4 head")
def preact_resnet18(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, image_shape)
