"""A small BatchNorm CNN for quick runs (8x8 digits on a CPU in seconds; also 28x28 / 32x32).

conv3x3(32)-BN-ReLU, conv3x3(64, stride 2)-BN-ReLU, conv3x3(128, stride 2)-BN-ReLU,
global average pool, Linear.  About 94k parameters for one input channel and 10 classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fairbench.models.base import register_model


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(image_shape[0], 32, 1),
            *_conv_bn_relu(32, 64, 2),
            *_conv_bn_relu(64, 128, 2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@register_model("smallcnn", "small 3-conv BatchNorm CNN for quick CPU runs (digits)")
def smallcnn(num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return SmallCNN(num_classes, image_shape)
