"""WideResNet as in the TRADES / FAT / DAFA code; ``wrn28_10`` is depth 28, widen factor 10.

16-channel 3x3 stem, three groups of (depth - 4) / 6 pre-activation BasicBlocks with
16*k / 32*k / 64*k channels (160/320/640 for k = 10) and strides 1/2/2, final BN + ReLU,
global average pool, Linear.  Dropout 0 and default BN momentum.  The reference code pools
with ``avg_pool2d(out, 8)`` on the 8x8 map of a 32x32 input; a global average pool is the
same thing there and also works for other input sizes.  Convolutions have no bias, BN weights
start at 1 and biases at 0, the Linear bias at 0, convs use He (fan_out) normal init.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairbench.models.base import register_model


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.shortcut = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal_in_out else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, image_shape: tuple[int, int, int],
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(image_shape[0], channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(channels[0], channels[1], n, 1, drop_rate)
        self.block2 = self._group(channels[1], channels[2], n, 2, drop_rate)
        self.block3 = self._group(channels[2], channels[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def wrn(depth: int, widen: int, num_classes: int, image_shape: tuple[int, int, int],
        drop_rate: float = 0.0) -> WideResNet:
    """A WideResNet-``depth``-``widen`` (depth = 6n + 4)."""
    return WideResNet(depth, widen, num_classes, image_shape, drop_rate)


@register_model("wrn28_10", "WideResNet-28-10 (TRADES/FAT/DAFA), dropout 0, global average pool")
def wrn28_10(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return wrn(28, 10, num_classes, image_shape)


@register_model("wrn34_10", "WideResNet-34-10 (the official TRADES code's model), dropout 0")
def wrn34_10(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return wrn(34, 10, num_classes, image_shape)
