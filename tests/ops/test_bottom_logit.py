"""bottom_logit against a per-sample Python loop over classes (float64)."""
from __future__ import annotations

import math

import pytest
import torch

from gloro_fast.ops import bottom_logit, bottom_logit_reference, class_distances

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def loop_bottom(f, d, k, eps, classes=None):
    """Per sample: j = first maximal f (or the given class); f_⊥ = max_{i≠j} f_i + εK D_ji,
    i* = the first maximising i. Only index j is excluded."""
    bots, stars = [], []
    for b, row in enumerate(f.tolist()):
        if classes is None:
            j = 0
            for i, v in enumerate(row):
                if v > row[j]:
                    j = i
        else:
            j = int(classes[b])
        best, best_i = -math.inf, -1
        for i, v in enumerate(row):
            if i == j:
                continue
            val = v + eps * k * float(d[j, i])
            if val > best:
                best, best_i = val, i
        bots.append(best)
        stars.append(best_i)
    return torch.tensor(bots, dtype=F64), torch.tensor(stars, dtype=torch.int64)


def random_problem(b, c, gen, scale=1.0):
    f = torch.randn(b, c, generator=gen, dtype=F64) * scale
    d = class_distances(torch.randn(c, 4, generator=gen, dtype=F64))
    return f, d


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.7])
@pytest.mark.parametrize("k", [0.0, 0.5, 2.3])
def test_matches_loop(c, eps, k, gen):
    f, d = random_problem(16, c, gen)
    bot, star = bottom_logit(f, d, torch.tensor(k, dtype=F64), eps)
    ref_bot, ref_star = loop_bottom(f, d, k, eps)
    assert bot.shape == (16,) and bot.dtype == F64 and star.dtype == torch.int64
    torch.testing.assert_close(bot, ref_bot, rtol=1e-14, atol=1e-14)
    assert torch.equal(star, ref_star)
    # never the reference class itself
    assert not (star == f.argmax(1)).any()


def test_float_lipschitz_same_as_tensor(gen):
    f, d = random_problem(8, 5, gen)
    a = bottom_logit(f, d, 1.25, 0.3)
    b = bottom_logit(f, d, torch.tensor(1.25, dtype=F64), 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_explicit_classes(gen):
    f, d = random_problem(20, 6, gen)
    classes = torch.randint(0, 6, (20,), generator=gen)
    bot, star = bottom_logit(f, d, 0.8, 0.5, classes)
    ref_bot, ref_star = loop_bottom(f, d, 0.8, 0.5, classes)
    torch.testing.assert_close(bot, ref_bot, rtol=1e-14, atol=1e-14)
    assert torch.equal(star, ref_star)
    assert not (star == classes).any()
    # rows whose class is not the argmax see the argmax class as a competitor
    for b in range(20):
        j, top = int(classes[b]), int(f[b].argmax())
        if j != top:
            assert float(bot[b]) >= float(f[b, top])
    # int32 classes are accepted
    bot32, star32 = bottom_logit(f, d, 0.8, 0.5, classes.int())
    assert torch.equal(bot32, bot) and torch.equal(star32, star)


def test_ties_in_logits_mask_only_lowest_index():
    f = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0],  # j = 1, the tied rival 2 stays a competitor
         [2.0, 2.0, 2.0, 2.0],  # all tied: j = 0, i* = 1
         [5.0, 0.0, 0.0, 5.0]],  # j = 0, rival 3
        dtype=F64,
    )
    d = torch.zeros(4, 4, dtype=F64)
    bot, star = bottom_logit(f, d, 1.0, 0.5)
    torch.testing.assert_close(bot, torch.tensor([3.0, 2.0, 5.0], dtype=F64), rtol=0, atol=0)
    assert star.tolist() == [2, 1, 3]
    # with a tie the ⊥ logit is never below f_j: the prediction is not certified
    j = torch.tensor([1, 0, 0])
    assert (bot >= f[torch.arange(3), j]).all()
    # and with positive distances f_⊥ is strictly above f_j
    d = torch.ones(4, 4, dtype=F64) - torch.eye(4, dtype=F64)
    bot, _ = bottom_logit(f, d, 1.0, 0.5)
    assert (bot > f[torch.arange(3), j]).all()
    ref_bot, ref_star = loop_bottom(f, d, 1.0, 0.5)
    torch.testing.assert_close(bot, ref_bot, rtol=0, atol=0)


def test_ties_in_bottom_candidates_pick_lowest_index():
    # all values exactly representable: f_i + ε K D_ji ties exactly
    f = torch.tensor([[0.0, 2.0, 1.5, 0.5], [0.5, 0.5, 3.0, 0.0]], dtype=F64)
    d = torch.tensor(
        [[0.0, 1.0, 1.0, 1.0],
         [2.0, 0.0, 0.5, 1.5],  # row 0 (j = 1): 0 + 2 = 1.5 + 0.5 = 0.5 + 1.5 = 2 → i* = 0
         [1.0, 1.0, 0.0, 1.5],  # row 1 (j = 2): 0.5 + 1 = 0.5 + 1 = 0 + 1.5 = 1.5 → i* = 0
         [1.0, 1.0, 1.0, 0.0]],
        dtype=F64,
    )
    bot, star = bottom_logit(f, d, 2.0, 0.5)  # ε K = 1
    assert bot.tolist() == [2.0, 1.5]
    assert star.tolist() == [0, 0]
    ref_bot, ref_star = loop_bottom(f, d, 2.0, 0.5)
    assert torch.equal(star, ref_star) and torch.equal(bot, ref_bot)
    # move the tie to the higher indices: i* follows
    d2 = d.clone()
    d2[1, 0] = 1.0
    bot, star = bottom_logit(f, d2, 2.0, 0.5)
    assert star.tolist()[0] == 2 and bot.tolist()[0] == 2.0


def test_two_classes(gen):
    f = torch.randn(10, 2, generator=gen, dtype=F64)
    d = torch.tensor([[0.0, 1.3], [1.3, 0.0]], dtype=F64)
    bot, star = bottom_logit(f, d, 2.0, 0.25)
    j = f.argmax(1)
    other = 1 - j
    assert torch.equal(star, other)
    torch.testing.assert_close(bot, f.gather(1, other[:, None])[:, 0] + 0.25 * 2.0 * 1.3, rtol=1e-15, atol=1e-15)


def test_empty_batch():
    f = torch.zeros(0, 4, dtype=F64)
    d = torch.zeros(4, 4, dtype=F64)
    for classes in (None, torch.zeros(0, dtype=torch.int64)):
        bot, star = bottom_logit(f, d, 1.0, 0.1, classes)
        assert bot.shape == (0,) and star.shape == (0,)
        assert bot.dtype == F64 and star.dtype == torch.int64


def test_gradients_match_formula(gen):
    f, d = random_problem(12, 5, gen, scale=3.0)
    f.requires_grad_(True)
    d = d.clone().requires_grad_(True)
    k = torch.tensor(1.7, dtype=F64, requires_grad=True)
    eps = 0.4
    bot, star = bottom_logit(f, d, k, eps)
    g = torch.randn(12, generator=gen, dtype=F64)
    bot.backward(g)
    j = f.detach().argmax(1)
    dd = d.detach()
    gf = torch.zeros(12, 5, dtype=F64)
    gd = torch.zeros(5, 5, dtype=F64)
    gk = 0.0
    for b in range(12):
        gf[b, star[b]] = g[b]
        gd[j[b], star[b]] += g[b] * eps * 1.7
        gk += float(g[b]) * eps * float(dd[j[b], star[b]])
    torch.testing.assert_close(f.grad, gf, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(d.grad, gd, rtol=1e-14, atol=1e-14)
    assert abs(float(k.grad) - gk) < 1e-12


def test_gradient_of_sum_expanded_grad(gen):
    f, d = random_problem(6, 4, gen, scale=3.0)
    f.requires_grad_(True)
    bottom_logit(f, d, 1.0, 0.2)[0].sum().backward()
    star = bottom_logit(f.detach(), d, 1.0, 0.2)[1]
    expect = torch.zeros(6, 4, dtype=F64)
    expect[torch.arange(6), star] = 1.0
    assert torch.equal(f.grad, expect)


def test_gradcheck(gen):
    # well-separated logits and candidates: no argmax switches under the probe eps
    f = torch.tensor([[0.0, 1.0, 2.5, -1.0], [3.0, -0.5, 0.7, 1.9], [-2.0, 0.4, -0.9, 2.2]], dtype=F64)
    d = torch.tensor(
        [[0.0, 1.1, 0.3, 0.9], [1.1, 0.0, 0.6, 2.0], [0.3, 0.6, 0.0, 0.45], [0.9, 2.0, 0.45, 0.0]], dtype=F64
    )
    k = torch.tensor(1.3, dtype=F64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (f, d, k))
    # check that the maximum is unique with margin >> probe step
    for b, row in enumerate(f.tolist()):
        j = max(range(4), key=lambda i: row[i])
        vals = sorted((row[i] + 0.35 * 1.3 * float(d[j, i]) for i in range(4) if i != j), reverse=True)
        assert vals[0] - vals[1] > 1e-2
        assert sorted(row)[-1] - sorted(row)[-2] > 1e-2
    assert torch.autograd.gradcheck(lambda a, b, c: bottom_logit(a, b, c, 0.35)[0], inputs, eps=1e-6, atol=1e-9)
    classes = torch.tensor([2, 2, 0])
    assert torch.autograd.gradcheck(
        lambda a, b, c: bottom_logit(a, b, c, 0.35, classes)[0], inputs, eps=1e-6, atol=1e-9
    )


def test_reference_matches_entry(gen):
    f, d = random_problem(9, 7, gen)
    a = bottom_logit(f, d, 0.9, 0.2)
    b = bottom_logit_reference(f, d, torch.tensor(0.9, dtype=F64), 0.2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _bad_cases():
    f = torch.randn(3, 4, dtype=F64)
    d = torch.zeros(4, 4, dtype=F64)
    nan_f = f.clone()
    nan_f[1, 2] = float("nan")
    return [
        ("one-class", lambda: bottom_logit(f[:, :1], d[:1, :1], 1.0, 0.1), ValueError, "logits"),
        ("logits-1d", lambda: bottom_logit(f[0], d, 1.0, 0.1), ValueError, "logits"),
        ("logits-int", lambda: bottom_logit(f.long(), d, 1.0, 0.1), TypeError, "logits"),
        ("logits-nan", lambda: bottom_logit(nan_f, d, 1.0, 0.1), ValueError, "logits"),
        ("logits-inf", lambda: bottom_logit(f.masked_fill(f > 0, math.inf), d, 1.0, 0.1), ValueError, "logits"),
        ("distances-shape", lambda: bottom_logit(f, d[:3], 1.0, 0.1), ValueError, "distances"),
        ("distances-square-wrong",
         lambda: bottom_logit(f, torch.zeros(5, 5, dtype=F64), 1.0, 0.1), ValueError, "distances"),
        ("distances-int", lambda: bottom_logit(f, d.long(), 1.0, 0.1), TypeError, "distances"),
        ("distances-nan", lambda: bottom_logit(f, d.fill_diagonal_(float("nan")), 1.0, 0.1), ValueError, "distances"),
        ("distances-device", lambda: bottom_logit(f, d.to("meta"), 1.0, 0.1), ValueError, "distances"),
        ("eps-negative", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, -0.1), ValueError, "epsilon"),
        ("eps-nan", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, float("nan")), ValueError, "epsilon"),
        ("eps-inf", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, math.inf), ValueError, "epsilon"),
        ("eps-str", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, "0.1"), TypeError, "epsilon"),
        ("k-negative", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), -1.0, 0.1), ValueError, "lipschitz"),
        ("k-negative-tensor",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), torch.tensor(-0.5, dtype=F64), 0.1),
         ValueError, "lipschitz"),
        ("k-nan", lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), float("nan"), 0.1), ValueError, "lipschitz"),
        ("k-vector",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), torch.ones(2, dtype=F64), 0.1), ValueError, "lipschitz"),
        ("k-int-tensor",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), torch.tensor(1), 0.1), TypeError, "lipschitz"),
        ("classes-high",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, 0.1, torch.tensor([0, 4, 1])),
         ValueError, "classes"),
        ("classes-negative",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, 0.1, torch.tensor([0, -1, 1])),
         ValueError, "classes"),
        ("classes-length",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, 0.1, torch.tensor([0, 1])), ValueError, "classes"),
        ("classes-float",
         lambda: bottom_logit(f, torch.zeros(4, 4, dtype=F64), 1.0, 0.1, torch.tensor([0.0, 1.0, 2.0])),
         TypeError, "classes"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case, debug_checks):
    _, fn, exc, name = case
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value)


def test_bad_values_without_debug_are_never_certified():
    """Outside debug mode the value checks (host synchronisations) do not run. What a
    certificate reads stays safe: a row holding NaN never passes f_j > f_⊥ (its max is NaN),
    a NaN or infinite K gives a non-finite ⊥, and out-of-range classes are refused by the C++
    CPU kernel with an error naming them (the CUDA kernel answers NaN and i* = −1)."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, generator=gen, dtype=F64)
    d = torch.rand(4, 4, generator=gen, dtype=F64).fill_diagonal_(0.0)
    d = d + d.t()
    bad = f.clone()
    bad[1, 2] = float("nan")
    bottom, _ = bottom_logit(bad, d, 1.0, 0.1)
    certified = bad.amax(dim=1) > bottom
    assert not certified[1]
    for k in (float("nan"), float("inf")):
        bottom, _ = bottom_logit(f, d, torch.tensor(k, dtype=F64), 0.1)
        assert not torch.isfinite(bottom).any() and not (f.amax(dim=1) > bottom).any()
    for classes in (torch.tensor([0, 4, 1]), torch.tensor([0, -1, 1])):
        try:
            bottom, index = bottom_logit(f, d, 1.0, 0.1, classes)
        except RuntimeError as exc:
            assert "classes" in str(exc)
        else:
            assert torch.isnan(bottom[1]) and index[1] == -1
