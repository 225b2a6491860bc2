"""Contract over every registered method: a tiny real step, finite loss, exact state round-trip and resume."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from fairbench.method import Batch, FairAT
from fairbench.registry import get_method_class, list_methods
from tests.conftest import build_method


def _setup(name: str, digits, ctx_epochs: int = 4):
    """The engine's order and functions: splits, context (with the services the method declares), setup."""
    cls = get_method_class(name)
    config = cls.Config()
    if hasattr(config, "warmup"):
        import dataclasses

        config = dataclasses.replace(config, warmup=1, steps=2)
    elif hasattr(config, "steps"):
        import dataclasses

        config = dataclasses.replace(config, steps=2)
    return build_method(cls, digits, config, epochs=ctx_epochs)


def _step(method: FairAT, model, batch: Batch, ctx, opt) -> torch.Tensor:
    out = method.training_loss(model, batch, ctx)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out.loss.detach()


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tiny_model, digits_batch, digits):
    cls = get_method_class(name)
    assert issubclass(cls, FairAT) and cls.name == name and cls.description
    model = tiny_model.train()
    method, ctx = _setup(name, digits)
    x, y, idx = digits_batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    # epoch 1 (the warm-up epoch for DAFA-style methods): a real step, finite loss, training mode kept
    method.on_epoch_start(1, model, ctx)
    model.train()
    loss = _step(method, model, Batch(x, y, idx), ctx, opt)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.training
    method.on_epoch_end(1, model, ctx)

    # snapshot everything a checkpoint holds, then take the next step twice: uninterrupted and resumed
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "method": copy.deepcopy(method.state_dict())}
    ctx.epoch = 2
    model.train()
    ctx.generator.manual_seed(123)
    loss_a = _step(method, model, Batch(x, y, idx), ctx, opt)
    weights_a = [p.detach().clone() for p in model.parameters()]

    fresh, ctx_b = _setup(name, digits)
    ctx_b.epoch = 2
    fresh.load_state_dict(saved["method"])
    assert _same_state(fresh.state_dict(), saved["method"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    model.train()
    ctx_b.generator.manual_seed(123)
    loss_b = _step(fresh, model, Batch(x, y, idx), ctx_b, opt)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(weights_a, model.parameters()):
        assert torch.equal(a, b.detach())
    assert fresh.eval_model(model) is not None


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_unknown_method_lists_choices():
    from fairbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError) as err:
        get_method_class("trixx")
    assert "trades" in str(err.value) and "trix" in str(err.value)


def test_builtins_present():
    assert {"trades", "dafa", "trix", "trix-basic", "trix-uniform", "dafa-uniform"} <= set(list_methods())


METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


def _imported_modules(path: Path) -> list[str]:
    """Every module a file imports ('.x' for relative imports), from its syntax tree."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted(METHODS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_a_method_file_imports_no_other_method(path):
    """One method, one file: a method reads top to bottom with the harness and its building blocks
    (fairbench.*), never another method's module (subclassing another method is importing it)."""
    own = {f"fairbench.methods.{path.stem}", f"methods.{path.stem}"}
    for module in _imported_modules(path):
        assert not module.startswith("."), f"{path.name} imports {module!r} (relative)"
        if module.split(".")[0] in ("methods",) or module.startswith("fairbench.methods"):
            assert module in own, f"{path.name} imports {module!r}: move what it shares into the harness"


def test_the_older_service_declarations_and_hook_signatures_are_refused():
    """A plugin written before `services` and the explicit model fails when its class is defined, by name."""
    with pytest.raises(TypeError, match="services = Services"):
        type("OldNeeds", (FairAT,), {"needs": frozenset({"sample_memory"})})
    with pytest.raises(TypeError, match="passes the model"):
        type("OldHook", (FairAT,), {"on_epoch_end": lambda self, epoch, ctx: None})


@pytest.mark.parametrize(("dataset", "lam"), [("cifar10", 1.0), ("cifar100", 1.5), ("stl10", 1.5), ("digits", 1.0)])
def test_dafa_lambda_is_a_method_default_of_the_dataset(dataset, lam):
    """DAFA/TRIX read lam from their config; the dataset sets it, `--set lam=` overrides it."""
    from fairbench.spec import RunSpec, resolve

    for method in ("dafa", "trix", "trix-basic"):
        assert resolve(RunSpec(method, dataset)).method_config.lam == lam
        assert resolve(RunSpec(method, dataset, overrides={"lam": "2.0"})).method_config.lam == 2.0
    assert resolve(RunSpec("trix", dataset)).method_config.lam_batch == 1.0  # the split's lambda is fixed
