"""The exact speedups of docs/evaluation.md §14 and the options around them: the search model (folded BatchNorm,
channels_last, bf16 with fp32 confirmation), runs side by side, Square's answers from memory, AA plus,
the official-package adapter's absence."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
import torch.nn as nn

from fairbench.attacks.apgd import APGD
from fairbench.attacks.autoattack import AutoAttack
from fairbench.attacks.fab import FAB
from fairbench.attacks.official import OfficialAutoAttack
from fairbench.attacks.registry import create_attack
from fairbench.attacks.search import EXACT, SearchModel, SearchSettings, confirmed_misclassified, search_model
from fairbench.attacks.square import Square
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.errors import FairbenchError
from fairbench.evaluation import cpu_shards, evaluate_split
from fairbench.models import create_model
from fairbench.records import robust_flags
from fairbench.spec import RunSpec, resolve
from tests.attack_fixtures import digits_test, trained_digits_model


@pytest.mark.parametrize("arch, shape, folded", [("smallcnn", (1, 8, 8), 3), ("resnet18", (3, 32, 32), 20)])
def test_search_model_folds_batchnorm_and_keeps_the_function(arch, shape, folded):
    torch.manual_seed(0)
    model = create_model(arch, 10, shape)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, *shape)
    searcher = SearchModel(model)
    assert searcher.folded == folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in searcher.inner.modules())
    with torch.no_grad():
        assert torch.allclose(searcher(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == folded
    assert search_model(model, EXACT) is model and search_model(model, None) is model


def test_bf16_claims_are_confirmed_in_fp32():
    model = trained_digits_model()
    x, y = digits_test(32)
    bf16 = SearchModel(model, SearchSettings(precision="bf16"))
    assert bf16.reduced and not SearchModel(model).reduced
    correct = model(x).argmax(1) == y
    claimed = torch.ones(32, dtype=torch.bool)  # a search that claims every sample broken
    assert torch.equal(confirmed_misclassified(bf16, x, y, claimed), ~correct)
    assert torch.equal(confirmed_misclassified(SearchModel(model), x, y, claimed), claimed)  # fp32: trusted
    with pytest.raises(ValueError, match="precision"):
        SearchSettings(precision="fp16")


def test_bf16_search_gives_feasible_verified_records():
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(40))
    fp32 = evaluate_split(model, split, ["apgd-ce"], 0.1, batch_size=40, seed=1)
    bf16 = evaluate_split(model, split, ["apgd-ce"], 0.1, batch_size=40, seed=1,
                          search=SearchSettings(precision="bf16"))
    a, b = (robust_flags(f).query("suite == 'apgd-ce'").correct.sum() for f in (fp32, bf16))
    assert abs(int(a) - int(b)) <= 2  # a different search process, about as strong
    rows = bf16[(bf16.suite == "apgd-ce") & bf16.success]
    assert len(rows) and (rows.pred != rows.label).all() and (rows.linf <= 0.1 + 1e-7).all()


@pytest.mark.parametrize("make", [lambda side: APGD(0.1, "dlr-targeted", steps=20, side_by_side=side),
                                  lambda side: APGD(0.1, "ce", steps=20, restarts=3, side_by_side=side),
                                  lambda side: FAB(0.1, steps=20, side_by_side=side)])
def test_runs_side_by_side_give_the_reference_order_flags(make):
    """All targets / restarts of a sample in one batch = one after the other on the survivors."""
    model = trained_digits_model()
    x, y = digits_test(48)
    active = model(x).argmax(1) == y
    ids = torch.arange(48)
    flags = []
    for side in (True, False):
        out = next(make(side).run(model, x, y, ids, 3, active)).x_adv
        flags.append(model(out).argmax(1) != y)
    assert torch.equal(flags[0], flags[1]) and (flags[0] & active).sum() >= 5


class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


def test_square_answers_unchanged_proposals_from_memory_and_still_counts_them():
    model = CountingModel(trained_digits_model())
    x, y = digits_test(24)
    active = model(x).argmax(1) == y
    model.rows = 0
    # small eps: most samples survive into the 1-pixel windows; one proposal per forward, so that rows
    # discarded by the lookahead do not hide the rows saved
    square = Square(2 / 255, n_queries=600, lookahead=1)
    adv, queries = square.perturb(model, x, y, torch.arange(24), 0, active)
    robust = active & (model.inner(adv).argmax(1) == y)
    assert robust.sum() >= 10 and (queries[robust] == 601).all()
    assert model.rows < int(queries.sum())  # fewer forwarded rows than queries counted


def test_square_lookahead_gives_the_one_at_a_time_results_with_fewer_forwards():
    model = CountingModel(trained_digits_model())
    x, y = digits_test(32)
    active = model(x).argmax(1) == y
    runs = {}
    for k in (1, 7):
        model.rows, calls = 0, []
        model.register_forward_hook(lambda *_: calls.append(1))
        adv, queries = Square(3 / 255, n_queries=400, lookahead=k).perturb(model, x, y, torch.arange(32), 3, active)
        model._forward_hooks.clear()
        runs[k] = adv, queries, len(calls)
    (adv1, q1, calls1), (adv7, q7, calls7) = runs[1], runs[7]
    broken = active & (model.inner(adv1).argmax(1) != y)
    assert broken.any() and (active & ~broken).any()  # both outcomes occur
    assert torch.equal(adv7, adv1) and torch.equal(q7, q1)
    assert calls7 * 4 < calls1


def test_square_remembers_rejected_proposals_with_the_same_results():
    """A proposal already rejected at the current point is answered from memory: same points and query
    counts, far fewer rows once the windows are a pixel wide (8x8 digits: 49 corners x 2 signs)."""
    model = CountingModel(trained_digits_model())
    x, y = digits_test(24)
    active = model(x).argmax(1) == y
    runs = {}
    for remember in (False, True):
        model.rows = 0
        adv, queries = Square(0.1, n_queries=3000, remember_rejected=remember).perturb(
            model, x, y, torch.arange(24), 0, active)
        runs[remember] = adv, queries, model.rows
    (adv0, q0, rows0), (adv1, q1, rows1) = runs[False], runs[True]
    robust = active & (model.inner(adv0).argmax(1) == y)
    assert robust.sum() >= 10 and (active & ~robust).any()
    assert torch.equal(adv1, adv0) and torch.equal(q1, q0)
    assert rows1 * 2 < rows0


@dataclasses.dataclass
class ShortAutoAttack(AutoAttack):
    """AutoAttack with 20 iterations and 200 queries per component (test speed)."""

    def components(self):
        return [dataclasses.replace(c, steps=20) if hasattr(c, "steps") else dataclasses.replace(c, n_queries=200)
                for c in super().components()]


def test_aa_plus_is_a_superset_of_standard():
    """plus runs every standard component with the same per-sample streams (and more), so a sample robust
    under plus is robust under standard."""
    plus = create_attack("aa-plus", 0.1)
    assert [c.component for c in plus.components()] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert [c.restarts for c in plus.components()[:3]] == [5, 5, 5] and not plus.components()[2].targeted
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(40))
    robust = {}
    for version in ("plus", "standard"):
        samples = evaluate_split(model, split, [ShortAutoAttack(0.1, version)], 0.1, batch_size=40, seed=4)
        flags = robust_flags(samples)
        robust[version] = flags[flags.suite == "shortautoattack"].set_index("sample_idx").correct.sort_index()
    assert not (robust["plus"] & ~robust["standard"]).any()
    assert robust["plus"].sum() < 35  # the suites did break samples


def test_aa_official_without_the_package_says_how_to_install_it():
    try:
        import autoattack  # noqa: F401
        pytest.skip("the official autoattack package is installed here")
    except ImportError:
        pass
    with pytest.raises(FairbenchError, match="pip install git\\+https://github.com/fra31/auto-attack"):
        create_attack("aa-official", 8 / 255)


def test_attack_precision_is_part_of_the_run_only_when_chosen():
    auto = resolve(RunSpec(method="trades", dataset="digits"))
    bf16 = resolve(RunSpec(method="trades", dataset="digits", attack_precision="bf16"))
    assert "attack_precision" not in auto.as_dict() and bf16.as_dict()["attack_precision"] == "bf16"
    assert auto.run_id != bf16.run_id


def test_cpu_shards_give_the_same_records():
    """Shards run in threads, one intra-op thread each; per-sample streams make the records identical."""
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(70))
    suites = [ShortAutoAttack(0.1), "pgd20"]
    threads = torch.get_num_threads()
    one = evaluate_split(model, split, suites, 0.1, 70, seed=2, workers=1)
    three = evaluate_split(model, split, suites, 0.1, 70, seed=2, workers=3)
    assert torch.get_num_threads() == threads  # restored
    pd.testing.assert_frame_equal(one, three)
    assert one.success.any() and (~one.success).any()
    assert cpu_shards(torch.device("cpu"), 70, 3) == 3 and cpu_shards(torch.device("cpu"), 20, 3) == 1


def test_attacks_drawing_from_the_global_rng_are_never_sharded():
    """The reference-RNG modes draw in the reference's batch order from the global RNG: sharded threads would
    interleave those draws. They run whole, so the records do not depend on the worker count."""
    assert not AutoAttack(0.1, reference_rng=True).shardable and not Square(0.1, reference_rng=True).shardable
    assert not OfficialAutoAttack.shardable and AutoAttack(0.1).shardable
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(40))
    runs = [evaluate_split(model, split, [ShortAutoAttack(0.1, reference_rng=True)], 0.1, 40, seed=0, workers=w)
            for w in (1, 2)]
    pd.testing.assert_frame_equal(*runs)
