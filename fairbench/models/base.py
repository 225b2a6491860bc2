"""Model registry: one decorator, one factory, one listing (timm's shape)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from fairbench.errors import UnknownNameError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    build: Callable[..., nn.Module]


MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, description: str) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelInfo(name, description, fn)
        return fn

    return wrap


def create_model(name: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """Build an architecture for inputs of shape (C, H, W) in [0, 1] returning logits."""
    if name not in MODELS:
        raise UnknownNameError("arch", name, list(MODELS))
    return MODELS[name].build(num_classes=num_classes, image_shape=image_shape)
