"""A small adversarially relevant model and digits samples for attack tests (trained once per session)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fairbench.data import load_dataset
from fairbench.models import create_model


@functools.lru_cache(maxsize=None)
def trained_digits_model(epochs: int = 4, seed: int = 0) -> torch.nn.Module:
    """smallcnn trained with plain SGD on digits for a few epochs (98% clean, far from robust at 8/255)."""
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = create_model("smallcnn", 10, (1, 8, 8))
    x = torch.from_numpy(data.train.images).float() / 255
    y = torch.from_numpy(data.train.labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def digits_test(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return torch.from_numpy(data.test.images[:n]).float() / 255, torch.from_numpy(data.test.labels[:n])
