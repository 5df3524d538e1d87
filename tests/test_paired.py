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


def test_clustered_mcnemar_against_the_chi_square_table():
    """Durkalski's statistic by hand; p-values from the chi-square(1) upper tail (scipy.stats.chi2.sf)."""
    before = [False] * 9 + [True]
    after = [True] * 9 + [False]
    # one problem per cluster: McNemar's chi-square (9 - 1)^2 / (9 + 1) = 6.4, p = 0.011412
    singletons = compare_paired(before, after, clusters=list(range(10)))
    assert singletons.clusters == 10 and singletons.clustered_p == pytest.approx(0.011412036, rel=1e-6)
    # the nine gains are one fact learned once: (9 - 1)^2 / (9^2 + 1^2) = 64 / 82, p = 0.376992
    one_fact = compare_paired(before, after, clusters=["5 * 2"] * 9 + ["3 + 4"])
    assert one_fact.clusters == 2 and one_fact.clustered_p == pytest.approx(0.376991993, rel=1e-6)
    assert one_fact.mcnemar_p == singletons.mcnemar_p  # the unclustered test cannot tell the two apart
    # changes that cancel inside a cluster carry no evidence either way; no change at all: p = 1
    mixed = compare_paired([False, True, False, False], [True, False, True, True], clusters=["a", "a", "b", "c"])
    assert mixed.clustered_p == pytest.approx(0.157299207, rel=1e-6)  # d = (0, 1, 1): 2^2 / 2 = 2
    assert compare_paired([True, False], [True, False], clusters=["a", "b"]).clustered_p == 1.0
    assert compare_paired(before, after).clustered_p is None
    with pytest.raises(ValueError, match="one cluster key per problem"):
        compare_paired(before, after, clusters=["a"])
