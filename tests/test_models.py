"""Model architectures: shapes, gradients, BatchNorm modes, memory formats, parameter counts."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from fairbench.errors import UnknownNameError
from fairbench.models import MODELS, create_model, list_models

SHAPES = [(3, 32, 32), (1, 8, 8), (3, 64, 64)]
SLOW = {("wrn28_10", (3, 64, 64))}  # backward too slow on two CPU cores: forward only

# Exact counts for CIFAR-10 (3x32x32, 10 classes).  preact_resnet18 has the final BN of the
# CFA / FAIR-TAT code (Rice et al.'s PreActResNet), 1,024 parameters more than kuangliu's 11,171,146.
PARAM_COUNTS = {
    "resnet18": 11_173_962,
    "preact_resnet18": 11_172_170,
    "wrn28_10": 36_479_194,
}


def _cases():
    return [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
            for name in list_models() for shape in SHAPES]


@functools.lru_cache(maxsize=None)
def _state(name: str, shape: tuple[int, int, int]) -> dict:
    torch.manual_seed(0)
    return create_model(name, 10, shape).state_dict()


def _model(name: str, shape: tuple[int, int, int]) -> nn.Module:
    """A fresh model with cached initial weights (building a WRN-28-10 is not free)."""
    model = create_model(name, 10, shape)
    model.load_state_dict(_state(name, shape))
    return model


def _batch(shape, n=2, seed=1):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_list_models_sorted_and_registered():
    names = list_models()
    assert names == sorted(MODELS)
    assert {"resnet18", "preact_resnet18", "wrn28_10", "smallcnn"} <= set(names)


@pytest.mark.parametrize("name,shape", _cases())
def test_forward_backward(name, shape):
    model = _model(name, shape).train()
    x = _batch(shape)
    if (name, shape) in SLOW:
        with torch.no_grad():
            assert model(x).shape == (2, 10)
        return
    out = model(x)
    assert out.shape == (2, 10) and out.dtype == torch.float32
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_eval_mode_is_per_sample_and_train_mode_uses_batch(name):
    shape = (3, 32, 32)
    model = _model(name, shape)
    x = _batch(shape, n=3)
    model.train()
    with torch.no_grad():
        model(x)  # move running stats away from their initial values
        train_out = model(x)
    model.eval()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # train mode normalises with batch statistics, eval with running ones
    assert not torch.allclose(train_out, together, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", SHAPES, ids=["32", "8", "64"])
def test_channels_last_matches_contiguous(name, shape):
    model = _model(name, shape).eval()
    x = _batch(shape)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list_models())
def test_bf16_autocast(name):
    shape = (3, 32, 32)
    model = _model(name, shape).train().to(memory_format=torch.channels_last)
    x = _batch(shape).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_parameter_counts(name, count):
    model = create_model(name, 10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == count


def test_smallcnn_is_small():
    for shape in SHAPES:
        assert sum(p.numel() for p in create_model("smallcnn", 10, shape).parameters()) < 150_000


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_resnet_heads(name):
    stl = create_model(name, 10, (3, 64, 64))
    assert (stl.linear.in_features, stl.linear.out_features) == (2048, 10)  # official STL-10 head
    assert create_model(name, 10, (3, 32, 32)).linear.in_features == 512
    assert create_model(name, 10, (1, 8, 8)).linear.in_features == 512  # global pool fallback
    assert create_model(name, 100, (3, 32, 32)).linear.out_features == 100


def test_grayscale_28x28_works():
    for name in ["smallcnn", "resnet18"]:
        model = create_model(name, 10, (1, 28, 28)).eval()
        with torch.no_grad():
            assert model(_batch((1, 28, 28))).shape == (2, 10)


def test_unknown_arch_lists_choices():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet9000", 10, (3, 32, 32))
    message = str(info.value)
    assert "resnet9000" in message
    for name in list_models():
        assert name in message
    assert isinstance(info.value, KeyError)


def test_wrn_helper():
    from fairbench.models import wrn

    model = wrn(16, 2, num_classes=5, image_shape=(3, 32, 32))
    with torch.no_grad():
        assert model(_batch((3, 32, 32))).shape == (2, 5)
    with pytest.raises(ValueError):
        wrn(27, 10, num_classes=10, image_shape=(3, 32, 32))
