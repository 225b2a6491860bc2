"""Counter-based random numbers: a value depends only on (seed, stream, sample id, element),
so attack results do not change with batch size, order, sharding or resume."""
from __future__ import annotations

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF


def _mul32(x: Tensor, const: int) -> Tensor:
    """(x * const) mod 2^32 for x < 2^32, split so that int64 products never overflow."""
    lo, hi = const & 0xFFFF, const >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply); good enough avalanche for attack noise."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def per_sample_uniform(sample_ids: Tensor, shape: tuple[int, ...], seed: int, stream: int = 0,
                       offset: int | Tensor = 0) -> Tensor:
    """Uniform [0, 1) floats of shape (B, *shape); row i is a fixed function of (seed, stream, sample_ids[i]).

    Row i holds elements offset .. offset + numel - 1 of sample i's stream (`offset` may differ per row), so
    a long stream can be drawn piece by piece (Square draws each sample's next windows where it stands)."""
    numel = 1
    for s in shape:
        numel *= s
    key = _hash32(_hash32(sample_ids.long() + _hash32(torch.tensor(seed * 7919 + stream, device=sample_ids.device))))
    counter = torch.arange(numel, device=sample_ids.device, dtype=torch.long)[None, :]
    counter = counter + (offset[:, None] if isinstance(offset, Tensor) else offset)
    bits = _hash32(_hash32(key[:, None] ^ counter) + key[:, None])
    return (bits >> 8).to(torch.float32).mul_(1.0 / (1 << 24)).reshape(len(sample_ids), *shape)
