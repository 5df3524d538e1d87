"""McNemar's exact test on paired outcomes, against values computed by hand from the binomial distribution."""

from __future__ import annotations

import pytest

from yulan_tune.evaluation.paired import compare_paired, mcnemar_exact_p


@pytest.mark.parametrize(("newly_right", "newly_wrong", "expected"), [
    (0, 0, 1.0),
    (0, 5, 2 / 32),                 # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (9, 1, 2 * (1 + 10) / 1024),    # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (98, 89, None),                 # close to even: p near 1, never above
    (3, 3, 1.0),                    # 2 * P(X <= 3), X ~ Bin(6, 1/2) = 2 * 42/64 > 1 -> capped
])
def test_mcnemar_exact_p(newly_right, newly_wrong, expected):
    p = mcnemar_exact_p(newly_right, newly_wrong)
    if expected is None:
        assert 0.5 < p <= 1.0
    else:
        assert p == pytest.approx(expected)
    assert p == mcnemar_exact_p(newly_wrong, newly_right)  # two-sided: symmetric


def test_compare_paired_counts_the_changed_problems():
    before = [True, True, False, False, False, True]
    after = [True, False, True, True, False, True]
    result = compare_paired(before, after)
    assert (result.n, result.newly_right, result.newly_wrong) == (6, 2, 1)
    assert result.before == pytest.approx(3 / 6) and result.after == pytest.approx(4 / 6)
    assert result.mcnemar_p == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    with pytest.raises(ValueError, match="same problems"):
        compare_paired([True], [True, False])
