"""FAB-T: the exact L-infinity projection, agreement with torchattacks' FAB, the linear known-answer test of
docs/evaluation.md §15, and invariants (feasibility, eps = 0, inactive samples, batch size)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from fairbench.attacks.fab import FAB, linf_boundary_step
from fairbench.attacks.pgd import project
from fairbench.attacks.registry import create_attack
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.errors import ClassCountError
from fairbench.evaluation import evaluate_split
from tests.attack_fixtures import digits_test, trained_digits_model

EPS = 8 / 255


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny forward/backward passes: on 2 shared cores OpenMP's barriers cost far more than they
    gain (measured: the batch-size test takes ~10 s on one thread, minutes on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lp_min_linf(t: np.ndarray, w: np.ndarray, r: float) -> float:
    """min ||d||_inf s.t. w.d = r, 0 <= t + d <= 1, by linear programming (variables d, s; minimise s)."""
    from scipy.optimize import linprog

    n = len(t)
    eye = np.eye(n)
    a_ub = np.block([[eye, -np.ones((n, 1))], [-eye, -np.ones((n, 1))]])  # |d_j| <= s
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None],
                  b_eq=[r], bounds=[(-tj, 1 - tj) for tj in t] + [(0, None)], method="highs")
    assert res.status == 0
    return float(res.x[-1])


def test_boundary_step_is_the_exact_linf_projection_onto_hyperplane_and_box():
    gen = torch.Generator().manual_seed(0)
    n, rows = 12, 40
    t = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    t[:, :3] = t[:, :3].round()  # pixels on the box faces: zero slack in one direction
    w = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    w[:, 3] = 0  # a coordinate the hyperplane ignores
    up = torch.rand(rows, generator=gen) < 0.5  # w.d > 0 or < 0
    sign = torch.where(up, 1.0, -1.0).double()
    reach = (w.abs() * torch.where(torch.sign(w) * sign[:, None] > 0, 1 - t, t)).sum(1)  # the box's limit
    r = sign * torch.rand(rows, generator=gen, dtype=torch.float64) * reach * 0.99
    r[::4] *= 0.02  # tiny steps: lambda below every slack
    d = linf_boundary_step(t, w, r)
    assert ((t + d) >= 0).all() and ((t + d) <= 1).all()
    assert torch.allclose((w * d).sum(1), r, atol=1e-12)
    assert (d[:, 3] == 0).all()
    for i in range(rows):
        assert d[i].abs().max().item() == pytest.approx(_lp_min_linf(t[i].numpy(), w[i].numpy(), r[i].item()),
                                                       abs=1e-9)
    # unreachable hyperplane: the step goes to the box corner that comes closest; r = 0: no step
    far = linf_boundary_step(t, w, 1.5 * reach * sign)
    corner = torch.where(torch.sign(w) * sign[:, None] > 0, 1 - t, -t) * (w != 0)
    assert torch.allclose(far, corner)
    assert (linf_boundary_step(t[:2], w[:2], torch.zeros(2, dtype=torch.float64)) == 0).all()


def _linear_problem(n: int = 96, seed: int = 0) -> tuple[nn.Module, DeviceSplit, torch.Tensor]:
    """f(x) = W x + b (C = 10) on 1x8x8 inputs uniform in [0.3, 0.7]; labels = clean predictions."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=gen))
        model[1].bias.copy_(torch.randn(10, generator=gen))
    model.eval()
    images = torch.randint(77, 179, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)  # [0.302, 0.698]
    x = images.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    wt, bt = model[1].weight.double().detach(), model[1].bias.double().detach()
    z = x.flatten(1).double() @ wt.T + bt
    gap = z.gather(1, y[:, None]) - z  # z_y - z_j
    norm = (wt[y][:, None, :] - wt[None, :, :]).abs().sum(2)  # ||w_y - w_j||_1
    radius = (gap / norm).masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("inf")).amin(1)
    return model, DeviceSplit(images, y, torch.arange(n)), radius


@pytest.mark.parametrize("suite", ["fab-t", "fab"])
def test_linear_known_answer_soundness_and_completeness(suite):
    """FAB-T and untargeted FAB (the closest boundary of all C classes) both find the minimal perturbation
    of a linear model."""
    model, split, radius = _linear_problem()
    frame = evaluate_split(model, split, [suite], EPS, batch_size=96)
    clean = frame[frame.suite == "clean"].set_index("sample_idx")
    fab = frame[frame.suite == suite].set_index("sample_idx").loc[np.arange(len(split))]
    assert not clean.success.any()  # labels are the clean predictions
    sure_robust = (radius > EPS * (1 + 1e-6)).numpy()
    sure_broken = (radius < 0.95 * EPS).numpy()
    assert sure_robust.sum() >= 10 and sure_broken.sum() >= 10  # the test separates both regimes
    assert not fab.success.to_numpy()[sure_robust].any()
    assert fab.success.to_numpy()[sure_broken].all()
    assert (fab.linf[fab.success] <= EPS + 1e-7).all()


def test_eps_zero_inactive_samples_and_exact_feasibility():
    model, split, _ = _linear_problem(n=24, seed=1)
    x, y = split.images.float() / 255, split.labels
    zero = evaluate_split(model, split, ["fab-t"], 0.0, batch_size=24)
    assert not zero[zero.suite == "fab-t"].success.any()
    active = torch.arange(24) % 3 != 0
    eps = 0.2  # large enough to break every active sample
    out = next(FAB(eps).run(model, x, y, torch.arange(24), 0, active))
    assert out.component == "fab-t"
    assert torch.equal(out.x_adv[~active], x[~active])  # inactive: returned unchanged, bit for bit
    assert torch.equal(project(out.x_adv, x, eps), out.x_adv)  # feasible: P reproduces it bit for bit
    with torch.no_grad():
        assert (model(out.x_adv[active]).argmax(1) != y[active]).all()


def test_registered_and_batch_size_independent():
    attack = create_attack("fab-t", EPS)
    assert isinstance(attack, FAB)
    assert {"steps": 100, "n_target_classes": 9, "restarts": 1, "random_start": False, "alpha_max": 0.1,
            "eta": 1.05, "beta": 0.9}.items() <= attack.settings().items()
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(24))
    a = evaluate_split(model, split, ["fab-t"], 0.1, batch_size=7)
    b = evaluate_split(model, split, ["fab-t"], 0.1, batch_size=32)
    # flags, predictions and labels identical; the floats up to the CPU kernels' batch-size-dependent rounding
    # (the clean forward already differs in the last bit between batch sizes, and FAB carries that along)
    floats = ["margin", "linf"]
    pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
    assert np.allclose(a.margin, b.margin, rtol=0, atol=1e-4)
    assert np.allclose(a.linf, b.linf, rtol=0, atol=1e-6)
    fab = a[a.suite == "fab-t"]
    assert fab.success.any() and (fab.attempted & ~fab.success).any()


def test_class_count_limits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.rand(5, 1, 2, 2)
    y = model(x).argmax(1).detach()
    out = FAB(0.5, steps=5).perturb(model, x, y, torch.ones(5, dtype=torch.bool))  # C = 2: one target
    assert torch.equal(project(out, x, 0.5), out)
    with pytest.raises(ClassCountError, match="fab-t needs at least 2 classes"):
        one_class = nn.Sequential(nn.Flatten(), nn.Linear(4, 1)).eval()
        FAB(0.5).perturb(one_class, x, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.bool))
    for name, classes, needed in (("apgd-dlr", 2, 3), ("apgd-t", 3, 4)):  # DLR needs the 3rd / 4th logit
        small = nn.Sequential(nn.Flatten(), nn.Linear(4, classes)).eval()
        with pytest.raises(ClassCountError, match=f"{name} needs at least {needed} classes"):
            create_attack(name, 0.5).perturb(small, x, y, torch.arange(5), 0, torch.ones(5, dtype=torch.bool))
    wide_enough = nn.Sequential(nn.Flatten(), nn.Linear(4, 4)).eval()
    create_attack("apgd-t", 0.5).perturb(wide_enough, x, y, torch.arange(5), 0, torch.ones(5, dtype=torch.bool))


# --- reference: torchattacks 3.5.1 (test-only, installed with --no-deps) -----------------------------------
#
# torchattacks' FAB (`attack_single_run_targeted` + `perturb`, multi_targeted=True, n_classes=10) follows the
# official fab_base.py step for step: same target ranking, update, storing and pull-back, and the same final
# rule `distance <= eps and misclassified`. Its `projection_linf` differs from the official
# fab_projections.py only in how the binary-search set is masked (`~c_l` vs `b - b2 <= 0`), the same set
# except for NaNs. It casts the inputs to float32 internally, so a float64 model cannot be used with it.
#
# The returned points agree to ~1e-4, not bit for bit: our projection computes the partial sums of the
# piecewise-linear progress directly (prefix and suffix cumulative sums), the reference as `-total + cumsum`
# (subtractive), which rounds differently in float32, and FAB's overshoot/pull-back loop carries the rounding
# through 100 iterations. Measured on this model (one target): ours deviates from a float64 run by 2.5e-5, the
# reference by 8.9e-5; with the reference's projection substituted, our loop reproduces torchattacks bit for
# bit. Distances agree to ~2e-7 and the success flags exactly.
NO_TORCHATTACKS = "torchattacks 3.5.1 (test-only, pip install --no-deps) is not importable"


def test_boundary_step_equals_the_reference_projection():
    fab = pytest.importorskip("torchattacks.attacks.fab", reason=NO_TORCHATTACKS)
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(300, 64, generator=gen, dtype=torch.float64)
    t[:, :20] = t[:, :20].round()
    w = torch.randn(300, 64, generator=gen, dtype=torch.float64)
    w[:, 20:24] = 0
    b = (w * t).sum(1) + 5 * torch.randn(300, generator=gen, dtype=torch.float64)  # some beyond the box
    ours = linf_boundary_step(t, w, b - (w * t).sum(1))
    assert torch.allclose(ours, fab.projection_linf(t, w, b), atol=1e-12)


@pytest.mark.parametrize("eps", [EPS, 0.1])
def test_fab_t_equals_torchattacks(eps):
    torchattacks = pytest.importorskip("torchattacks", reason=NO_TORCHATTACKS)
    model = trained_digits_model()
    x, y = digits_test(32)
    ref = torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                           n_classes=10, seed=0)(x, y)
    with torch.no_grad():
        active = model(x).argmax(1) == y
        ours = FAB(eps).perturb(model, x, y, active)
        ref_broken = model(ref).argmax(1) != y
        our_broken = model(ours).argmax(1) != y
    assert torch.equal(our_broken & active, ref_broken & active)
    both = our_broken & active
    assert both.any()
    assert torch.allclose(ours[both], project(ref, x, eps)[both], atol=5e-4, rtol=0)
    linf = lambda a: (a - x).flatten(1).abs().amax(1)  # noqa: E731
    assert torch.allclose(linf(ours)[both], linf(ref)[both], atol=2e-6, rtol=0)
    assert torch.equal(ours[~both], x[~both])
