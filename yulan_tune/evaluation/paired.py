"""Comparing two models on the same problems: which problems each newly gets right or wrong, and whether the change
is more than the evaluation's noise (McNemar's exact test).

On paired binary outcomes only the discordant problems carry information: b newly right, c newly wrong. Under "no
change" each of the b + c is equally likely to go either way, so b ~ Binomial(b + c, 1/2); the two-sided exact
p-value is min(1, 2 P(X <= min(b, c))) (McNemar 1947; the exact binomial form, since b + c is small here).

McNemar's test counts every problem as an independent draw. The bundled math problems are not: 1000 held-out
problems hold 476 distinct worked solutions (the 165 multiplications only 25: "5 * 2 = 10" 13 times, in other
words), and a model that unlearns one fact gets every problem that uses it wrong at once. With `clusters` (one key
per problem, e.g. its worked solution) `compare_paired` also gives the clustered McNemar test of Durkalski et al.
(2003, Statistics in Medicine 22:2417, "Analysis of clustered matched-pair data"): with d_k = newly right - newly
wrong in cluster k, X^2 = (sum_k d_k)^2 / sum_k d_k^2 against chi-square with 1 degree of freedom. With one problem
per cluster it is McNemar's chi-square (b - c)^2 / (b + c); where changes come in clusters its p is larger, as
it should be.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PairedComparison:
    n: int
    before: float  # accuracy before
    after: float
    newly_right: int  # wrong before, right after
    newly_wrong: int  # right before, wrong after
    mcnemar_p: float  # two-sided exact p-value of "no change"
    clusters: int | None = None  # distinct cluster keys, when given
    clustered_p: float | None = None  # Durkalski's clustered McNemar p-value, when clusters are given

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact_p(newly_right: int, newly_wrong: int) -> float:
    discordant = newly_right + newly_wrong
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(newly_right, newly_wrong) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def clustered_mcnemar_p(before: Sequence[bool], after: Sequence[bool], clusters: Sequence[Hashable]) -> float:
    """Durkalski et al.'s clustered McNemar test (module docstring): X^2 = (sum d_k)^2 / sum d_k^2, chi-square 1 df."""
    change: dict[Hashable, int] = defaultdict(int)
    for b, a, key in zip(before, after, clusters, strict=True):
        change[key] += int(a and not b) - int(b and not a)
    spread = sum(d * d for d in change.values())
    if spread == 0:
        return 1.0
    statistic = sum(change.values()) ** 2 / spread
    return math.erfc(math.sqrt(statistic / 2))  # the chi-square(1) upper tail


def compare_paired(before: Sequence[bool], after: Sequence[bool],
                   clusters: Sequence[Hashable] | None = None) -> PairedComparison:
    """`before[i]` / `after[i]`: whether problem i was solved before / after; `clusters[i]`: problem i's cluster."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same problems: {len(before)} before, {len(after)} after")
    if clusters is not None and len(clusters) != len(before):
        raise ValueError(f"one cluster key per problem: {len(clusters)} keys for {len(before)} problems")
    newly_right = sum(not b and a for b, a in zip(before, after))
    newly_wrong = sum(b and not a for b, a in zip(before, after))
    n = max(len(before), 1)
    return PairedComparison(len(before), sum(before) / n, sum(after) / n, newly_right, newly_wrong,
                            mcnemar_exact_p(newly_right, newly_wrong),
                            None if clusters is None else len(set(clusters)),
                            None if clusters is None else clustered_mcnemar_p(before, after, clusters))


def describe_change(paired: dict[str, Any]) -> str:
    """"newly right 50, newly wrong 34, McNemar p=0.101, clustered p=0.194 over 476 clusters" from `as_dict()`."""
    text = (f"newly right {paired['newly_right']}, newly wrong {paired['newly_wrong']}, "
            f"McNemar p={paired['mcnemar_p']:.3g}")
    if paired.get("clustered_p") is not None:
        text += f", clustered p={paired['clustered_p']:.3g} over {paired['clusters']} clusters"
    return text
