"""Comparing two models on the same problems: which problems each newly gets right or wrong, and whether the change
is more than the evaluation's noise (McNemar's exact test).

On paired binary outcomes only the discordant problems carry information: b newly right, c newly wrong. Under "no
change" each of the b + c is equally likely to go either way, so b ~ Binomial(b + c, 1/2); the two-sided exact
p-value is min(1, 2 P(X <= min(b, c))) (McNemar 1947; the exact binomial form, since b + c is small here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact_p(newly_right: int, newly_wrong: int) -> float:
    discordant = newly_right + newly_wrong
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(newly_right, newly_wrong) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def compare_paired(before: Sequence[bool], after: Sequence[bool]) -> PairedComparison:
    """`before[i]` / `after[i]`: whether problem i was solved before / after."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same problems: {len(before)} before, {len(after)} after")
    newly_right = sum(not b and a for b, a in zip(before, after))
    newly_wrong = sum(b and not a for b, a in zip(before, after))
    n = max(len(before), 1)
    return PairedComparison(len(before), sum(before) / n, sum(after) / n, newly_right, newly_wrong,
                            mcnemar_exact_p(newly_right, newly_wrong))
