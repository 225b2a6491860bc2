"""CIFAR ResNet-18 as used by the TRADES / DAFA / TRIX code.

3x3 stem (64 channels, stride 1, no bias) + BN + ReLU, no max-pool, four stages of two
BasicBlocks (64/128/256/512 channels, strides 1/2/2/2), ``F.avg_pool2d(out, 4)``, flatten,
Linear.  Inputs are float images in [0, 1]; there is no normalisation inside the model.

Head size: the final feature map is H/8 x W/8 and is average-pooled with a 4x4 window, so the
Linear input is ``512 * (H/32) * (W/32)``: 512 for 32x32 inputs (CIFAR) and 2048 for 64x64
inputs (the official STL-10 head, ``Linear(2048, 10)``).  When the final map is smaller than
4x4 (e.g. 8x8 digits give a 1x1 map) a 4x4 window cannot be applied, so a global average pool
to 1x1 is used instead and the Linear input is 512.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairbench.models.base import register_model


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


def final_map_size(image_shape: tuple[int, int, int], strides: tuple[int, ...] = (1, 1, 2, 2, 2)) -> tuple[int, int]:
    """(h, w) of the last feature map of a CIFAR ResNet (stem + four stages) for an input (C, H, W)."""
    _, h, w = image_shape
    for s in strides:
        h, w = _conv_out(h, s), _conv_out(w, s)
    return h, w


def pooled_size(image_shape: tuple[int, int, int]) -> tuple[int, int] | None:
    """Spatial size after ``avg_pool2d(out, 4)``, or None when the map is too small (global pool)."""
    h, w = final_map_size(image_shape)
    if h < 4 or w < 4:
        return None
    return h // 4, w // 4


def pool_head(out: torch.Tensor, use_global: bool) -> torch.Tensor:
    """The CIFAR ResNet head pooling followed by a (memory-format independent) flatten."""
    out = F.adaptive_avg_pool2d(out, 1) if use_global else F.avg_pool2d(out, 4)
    return torch.flatten(out, 1)  # reshape, so correct under channels_last too


def make_stages(block: type[nn.Module], num_blocks: list[int]) -> list[nn.Sequential]:
    """The four stages of a CIFAR ResNet (64/128/256/512 channels, strides 1/2/2/2), named layer1..4 by callers
    so parameter names match the official checkpoints."""
    in_planes, stages = 64, []
    for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(block(in_planes, planes, s))
            in_planes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stages


def make_head(image_shape: tuple[int, int, int], features: int, num_classes: int) -> tuple[nn.Linear, bool]:
    """(Linear head, use global pool) by the head-size rule of the module docstring."""
    pooled = pooled_size(image_shape)
    spatial = 1 if pooled is None else pooled[0] * pooled[1]
    return nn.Linear(features * spatial, num_classes), pooled is None


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, image_shape: tuple[int, int, int]):
        super().__init__()
        in_channels = image_shape[0]
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(BasicBlock, num_blocks)
        self.linear, self.global_pool = make_head(image_shape, 512 * BasicBlock.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(pool_head(out, self.global_pool))


@register_model("resnet18", "CIFAR ResNet-18 (TRADES/DAFA/TRIX): 3x3 stem, no max-pool, avg_pool 4 head")
def resnet18(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes, image_shape)
