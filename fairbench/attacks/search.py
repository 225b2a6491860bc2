"""The model attacks search with, prepared for speed (docs/evaluation.md §14 and §12).

Attacks only *search* with this model; every claimed success and every final flag is decided by the
original model in strict fp32 (`fairbench.evaluate`), so a faster search model can change which points
are found only through floating-point rounding (fp32) or reduced precision (bf16), never what counts.

- BatchNorm in eval mode is an affine map: folded into the preceding convolution, it costs nothing
  (`torch.fx` traces the model; a model that cannot be traced is used unfolded).
- channels_last is the layout oneDNN (CPU) and cuDNN (GPU) run convolutions fastest in.
- Precision (docs/evaluation.md §12): `auto` searches in TF32 on CUDA (PyTorch's own default for
  convolutions) and in fp32 on CPU; `bf16` (autocast) is opt-in: on GPUs and CPUs with AMX it roughly
  halves a pass again, but it is a different (A/B-checked) search process. A success claimed in reduced
  precision is confirmed in strict fp32 before the sample leaves the attack (`confirmed_misclassified`),
  so bf16 cannot create false successes, only miss some.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.overrides import ATTACK_PRECISIONS

Precision = Literal["auto", "fp32", "tf32", "bf16"]


@dataclass(frozen=True)
class SearchSettings:
    fold_batchnorm: bool = True
    channels_last: bool = True
    precision: Precision = "auto"

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision == "auto":
            return "tf32" if device.type == "cuda" else "fp32"
        return "fp32" if self.precision == "tf32" and device.type != "cuda" else self.precision

    def __post_init__(self) -> None:
        if self.precision not in ATTACK_PRECISIONS:
            raise ValueError(f"search precision must be one of {', '.join(ATTACK_PRECISIONS)}, got {self.precision!r}")


EXACT = SearchSettings(fold_batchnorm=False, channels_last=False, precision="fp32")
"""The model exactly as trained (reference-equality tests)."""


class SearchModel(nn.Module):
    """Wraps a prepared copy of a classifier; returns fp32 logits whatever the search precision."""

    def __init__(self, model: nn.Module, settings: SearchSettings = SearchSettings()):
        super().__init__()
        self.settings = settings
        self.folded = 0
        inner = model
        if settings.fold_batchnorm:
            inner, self.folded = fold_batchnorm(model)
        if settings.channels_last:
            inner = inner if inner is not model else copy.deepcopy(model)
            inner = inner.to(memory_format=torch.channels_last)
        for p in inner.parameters():
            p.requires_grad_(False)
        self.inner = inner.eval()
        self.exact = [model]  # the verdict model, kept out of the module tree
        self.precision = settings.resolved_precision(next(model.parameters(), torch.empty(0)).device)

    @property
    def reduced(self) -> bool:
        """Searching below fp32 (bf16, or TF32 convolutions on CUDA)."""
        return self.precision != "fp32"

    def forward(self, x: Tensor) -> Tensor:
        if self.settings.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.inner(x).float()
        if self.precision == "tf32":
            with tf32_allowed(True, x.device):
                return self.inner(x).float()
        return self.inner(x).float()

    def describe(self) -> dict:
        return {"fold_batchnorm": self.folded, "channels_last": self.settings.channels_last,
                "precision": self.precision}


@contextlib.contextmanager
def tf32_allowed(allowed: bool, device: torch.device | None = None) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions on or off inside the block. The flags are process-global, so
    for a CPU `device` (where they mean nothing) they are left alone: CPU evaluation shards run in threads."""
    if device is not None and device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def confirmed_misclassified(model: nn.Module, x: Tensor, y: Tensor, claimed: Tensor) -> Tensor:
    """`claimed` (misclassified according to the search model), confirmed by the verdict model in strict
    fp32 where the search runs in reduced precision (docs/evaluation.md §12); unchanged otherwise."""
    if not isinstance(model, SearchModel) or not model.reduced or not bool(claimed.any()):
        return claimed
    with tf32_allowed(False, x.device):
        exact = model.exact[0](x[claimed].float()).float().argmax(1) != y[claimed]
    out = claimed.clone()
    out[claimed.clone()] = exact
    return out


def search_model(model: nn.Module, settings: SearchSettings | None) -> nn.Module:
    """The model to search with: `model` itself for `None` or the exact settings, else a prepared copy."""
    if settings is None or settings == EXACT:
        return model
    return SearchModel(model, settings)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """(an eval-mode copy with every Conv2d -> BatchNorm2d pair folded, number of pairs folded).

    A pair is folded only when the BN is the convolution's sole consumer (pre-activation blocks, whose BN
    comes before the convolution, keep their BNs). Returns the model unchanged if it cannot be traced.
    """
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        fused = fuse(model, inplace=False)
    except Exception as exc:  # a user model with data-dependent control flow: search unfolded
        warnings.warn(f"BatchNorm folding skipped ({type(exc).__name__}: {exc}); attacks search with the "
                      f"unfolded model", stacklevel=2)
        return model, 0
    finally:
        model.train(was_training)
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    after = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    return fused.eval(), before - after
