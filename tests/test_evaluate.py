"""Class-wise evaluation: feasibility, robust <= clean, batch-size independence, counts from records."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from fairbench.attacks.apgd import APGD
from fairbench.attacks.autoattack import AutoAttack
from fairbench.attacks.fab import FAB
from fairbench.attacks.pgd import PGD, project
from fairbench.attacks.rng import per_sample_uniform
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.evaluation import evaluate_split
from fairbench.records import cascade_prefixes, per_class_counts, robust_flags
from fairbench.tables import derived_rows
from tests.attack_fixtures import trained_digits_model


def _split(digits, n=120):
    return DeviceSplit.from_arrays(digits.test, torch.device("cpu")).subset(torch.arange(n))


def _trained(tiny_model, digits):
    x = torch.from_numpy(digits.train.images).float() / 255
    y = torch.from_numpy(digits.train.labels)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for i in range(0, len(y), 64):
            loss = torch.nn.functional.cross_entropy(tiny_model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad(), loss.backward(), opt.step()
    return tiny_model.eval()


def test_records_are_feasible_consistent_and_batch_size_independent(tiny_model, digits):
    model = _trained(tiny_model, digits)
    split = _split(digits)
    a = evaluate_split(model, split, ["pgd20"], eps=8 / 255, batch_size=32, seed=1)
    b = evaluate_split(model, split, ["pgd20"], eps=8 / 255, batch_size=7, seed=1)
    pd.testing.assert_frame_equal(a, b)
    pgd = a[a.suite == "pgd20"]
    assert (pgd.linf <= 8 / 255 + 1e-7).all()
    assert (pgd.success <= pgd.attempted).all() and (pgd.success_any >= pgd.success).all()
    counts = per_class_counts(a, 10)
    clean = counts[counts.attack == "clean"].set_index("class_id")
    robust = counts[counts.attack == "pgd20"].set_index("class_id")
    assert (robust.correct <= clean.correct).all() and robust.correct.sum() < clean.correct.sum()
    assert (clean.n == np.bincount(split.labels.numpy(), minlength=10)).all()
    assert 0.8 < clean.correct.sum() / clean.n.sum()


def test_robust_flags_follow_the_cascade_rule():
    samples = pd.DataFrame({
        "suite": ["clean"] * 3 + ["aa"] * 6, "component": ["clean"] * 3 + ["apgd-ce"] * 3 + ["apgd-t"] * 3,
        "sample_idx": [0, 1, 2] * 3, "label": [0, 1, 1] * 3,
        "success": [False, False, True, False, True, False, True, False, False],
    })
    flags = robust_flags(samples).set_index(["suite", "sample_idx"]).correct
    assert flags[("clean", 0)] and flags[("clean", 1)] and not flags[("clean", 2)]
    assert not flags[("aa", 0)] and not flags[("aa", 1)] and not flags[("aa", 2)]


def test_pgd_points_satisfy_the_exact_feasibility_check(tiny_model, digits):
    model = _trained(tiny_model, digits)
    x = torch.from_numpy(digits.test.images[:50]).float() / 255
    y = torch.from_numpy(digits.test.labels[:50])
    out = next(PGD(8 / 255).run(model, x, y, torch.arange(50), 0, torch.ones(50, dtype=torch.bool)))
    assert torch.equal(project(out.x_adv, x, 8 / 255), out.x_adv)  # P is idempotent: feasible bit for bit


def test_counter_rng_depends_only_on_sample_id():
    ids = torch.tensor([5, 9, 2])
    a = per_sample_uniform(ids, (3, 4), seed=1)
    b = per_sample_uniform(ids.flip(0), (3, 4), seed=1).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, per_sample_uniform(ids, (3, 4), seed=2))
    u = per_sample_uniform(torch.arange(2000), (50,), seed=0)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_cw20_equals_an_independent_minimal_loop(tiny_model, digits):
    """torchattacks has no L-inf CW; the reference is the FAT/MAIL-style loop written out here."""
    model = _trained(tiny_model, digits)
    x = torch.from_numpy(digits.test.images[:32]).float() / 255
    y = torch.from_numpy(digits.test.labels[:32])
    ids = torch.arange(32)
    out = next(PGD(8 / 255, steps=20, alpha=0.003, loss="cw").run(model, x, y, ids, 5, torch.ones(32, dtype=torch.bool)))
    eps = 8 / 255
    x_adv = (x + eps * (per_sample_uniform(ids, (1, 8, 8), 5, stream=1) * 2 - 1)).clamp(0, 1)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    for _ in range(20):
        x_adv.requires_grad_(True)
        z = model(x_adv)
        onehot = torch.nn.functional.one_hot(y, 10).bool()
        correct = z[onehot]
        other = (z - 1e4 * onehot.float()).max(1).values
        loss = -torch.clamp(correct - other + 50, min=0).sum()
        grad = torch.autograd.grad(loss, x_adv)[0]
        x_adv = torch.min(torch.max(x_adv.detach() + 0.003 * grad.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(out.x_adv, x_adv)


@dataclasses.dataclass
class WeakFirstCascade(AutoAttack):
    """A cascade whose first component is weak (one APGD step), so later components break samples too."""

    def components(self):
        return [APGD(self.eps, "ce", steps=1, component="apgd-ce"),
                APGD(self.eps, "dlr-targeted", steps=5, component="apgd-t"), FAB(self.eps, steps=10)]


def test_cascade_prefixes_count_what_the_first_components_broke(tmp_path):
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(80))
    records = evaluate_split(model, split, [WeakFirstCascade(0.1)], 0.1, 80, seed=0)
    prefixes = cascade_prefixes(records)
    suite = records.suite[records.suite != "clean"].iloc[0]
    assert list(pd.unique(prefixes.suite)) == [f"{suite}:apgd-ce", f"{suite}:apgd-t"]
    clean_ok = set(records.query("suite == 'clean' and not success").sample_idx)
    robust = [prefixes[prefixes.suite == f"{suite}:{c}"].set_index("sample_idx").correct
              for c in ("apgd-ce", "apgd-t")]
    for k, flags in enumerate(robust, start=1):  # an independent count: no success among orders 1..k
        broken = set(records.query("suite == @suite and order <= @k and success").sample_idx)
        assert {i for i, ok in flags.items() if ok} == clean_ok - broken
    full = robust_flags(records).query("suite == @suite").set_index("sample_idx").correct
    assert robust[0].sum() > robust[1].sum() >= full.sum()  # APGD-T broke samples APGD-CE left
    assert cascade_prefixes(records[records.suite == "clean"]) is None
    # `fairbench table --cascade`: per-class rows beside the suite's own, from the stored records
    records.assign(epoch=3).to_parquet(tmp_path / "samples.parquet")
    classwise = per_class_counts(records, 10).assign(epoch=3, run_id="r")
    rows = derived_rows(classwise, tmp_path / "samples.parquet", union=False, cascade=True)
    assert list(pd.unique(rows.attack)) == [f"{suite}:apgd-ce", f"{suite}:apgd-t"] and set(rows.epoch) == {3}
    for k, attack in enumerate(pd.unique(rows.attack)):
        assert rows[rows.attack == attack].correct.sum() == robust[k].sum()
        assert rows[rows.attack == attack].n.tolist() == classwise[classwise.attack == suite].n.tolist()
