"""DAFA weights and the TRIX split against direct loops over the documented rules (docs/methods/dafa.md §2.2,
docs/methods/trix.md §2.1), on random inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairbench.classweights import batch_class_similarity, dafa_weights, random_wrong_targets, targeted_mask


def loop_weights(p: torch.Tensor, lam: float, tie_rule: str = "code") -> torch.Tensor:
    """The official pairwise loop (docs/methods/dafa.md §2.2), written out term by term in the same order."""
    c = p.shape[0]
    w = torch.ones(c, dtype=p.dtype)
    for i in range(c):
        for j in range(c):
            if i == j:
                continue
            if p[i, i] < p[j, j]:
                w[i] = w[i] + lam * p[i, j] * p[j, j]
            elif (p[i, i] >= p[j, j]) if tie_rule == "code" else (p[i, i] > p[j, j]):
                w[i] = w[i] - lam * p[j, i] * p[i, i]
    return w


def loop_batch_similarity(probs: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    q = torch.zeros(c, probs.shape[1], dtype=probs.dtype)
    for k in range(c):
        members = [i for i in range(len(labels)) if labels[i] == k]
        if members:
            total = torch.zeros(probs.shape[1], dtype=probs.dtype)
            for i in members:
                total = total + probs[i]
            q[k] = total / len(members)
        q[k, k] = q[k, k] + 1e-8
    return q


def random_similarity(gen: torch.Generator, c: int, dtype=torch.float32) -> torch.Tensor:
    return torch.softmax(torch.randn(c, c, generator=gen) * 2, dim=1).to(dtype)


@pytest.mark.parametrize("tie_rule", ["code", "paper"])
@pytest.mark.parametrize("c", [3, 10, 100])
def test_vectorised_weights_equal_loop(c, tie_rule):
    gen = torch.Generator().manual_seed(c)
    for trial in range(5):
        p = random_similarity(gen, c)
        if trial % 2:  # ties on the diagonal
            d = torch.diagonal(p).clone()
            d[: c // 2] = d[0]
            p = p.clone()
            p[range(c), range(c)] = d
        lam = float(torch.rand(1, generator=gen)) * 2
        assert torch.equal(dafa_weights(p, lam, tie_rule), loop_weights(p, lam, tie_rule))


def test_worked_example_and_sum_rule():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]], dtype=torch.float64)
    w = dafa_weights(p, 1.0)
    assert torch.allclose(w, torch.tensor([1.38, 0.68, 0.94], dtype=torch.float64), atol=1e-12)
    assert float(w.sum()) == pytest.approx(3.0)
    # lambda = 0 is TRADES; W - 1 is linear in lambda
    assert torch.equal(dafa_weights(p, 0.0), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(dafa_weights(p, 2.0) - 1, 2 * (w - 1))


def test_tie_rules_differ_only_on_ties():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    code, paper = dafa_weights(p, 1.0, "code"), dafa_weights(p, 1.0, "paper")
    assert float(paper.sum()) == pytest.approx(3.0)
    assert float(code.sum()) < 3.0  # the tie decrements both classes


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(1)
    p = random_similarity(gen, 10, torch.float64)
    perm = torch.randperm(10, generator=gen)
    assert torch.allclose(dafa_weights(p[perm][:, perm], 1.5), dafa_weights(p, 1.5)[perm])


def test_batch_similarity_equals_loop_with_absent_classes():
    gen = torch.Generator().manual_seed(2)
    for c in (10, 100):
        labels = torch.randint(0, c // 2, (128,), generator=gen)  # half the classes absent
        probs = torch.softmax(torch.randn(128, c, generator=gen), 1)
        q = batch_class_similarity(probs, labels, c)
        assert torch.equal(q, loop_batch_similarity(probs, labels, c))
        v = dafa_weights(q, 1.0)
        assert torch.equal(v, loop_weights(q, 1.0))
        absent = torch.ones(c, dtype=torch.bool)
        absent[labels.unique()] = False
        assert torch.equal(v[absent], torch.ones(int(absent.sum())))


def test_two_present_classes_sum_to_two():
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([2, 7] * 16)
    probs = torch.softmax(torch.randn(32, 10, generator=gen), 1)
    v = dafa_weights(batch_class_similarity(probs, labels, 10), 1.0)
    assert float(v[2] + v[7]) == pytest.approx(2.0, abs=1e-6)


def test_targeted_mask_invariants():
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        c = int(torch.randint(2, 12, (1,), generator=gen))
        labels = torch.randint(0, c, (64,), generator=gen)
        probs = torch.softmax(torch.randn(64, c, generator=gen) * 3, 1)
        v = dafa_weights(batch_class_similarity(probs, labels, c), 1.0)
        s = v[labels]
        mask = targeted_mask(s)
        assert 0 <= int(mask.sum()) < len(labels)
        top = v[labels.unique()].max()
        assert not mask[s == top].any()  # the highest-weighted present class is never targeted
        assert torch.equal(mask, s < s.mean())  # below the mean over *samples*, strictly
    one_class = torch.full((16,), 3)
    v = dafa_weights(batch_class_similarity(torch.softmax(torch.randn(16, 5), 1), one_class, 5), 1.0)
    assert not targeted_mask(v[one_class]).any()


def test_targets_are_uniform_over_wrong_classes():
    gen = torch.Generator().manual_seed(5)
    labels = torch.full((20000,), 3)
    t = random_wrong_targets(labels, 10, gen)
    assert not (t == labels).any()
    counts = np.bincount(t.numpy(), minlength=10)
    assert counts[3] == 0
    expected = 20000 / 9
    chi2 = float(((counts[np.arange(10) != 3] - expected) ** 2 / expected).sum())
    assert chi2 < 26.1  # chi-square 8 dof, p = 0.001
