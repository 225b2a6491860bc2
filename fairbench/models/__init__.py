"""Model architectures; importing this package registers them all."""
from __future__ import annotations

from fairbench.models import preact_resnet, resnet, small, wideresnet  # noqa: F401  (register)
from fairbench.models.base import MODELS, ModelInfo, create_model, register_model
from fairbench.models.wideresnet import wrn


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(MODELS)


__all__ = ["MODELS", "ModelInfo", "create_model", "register_model", "list_models", "wrn"]
