"""Self-consistency voting: where no reference answer exists, the answer most samples agree on stands in for it
(Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning"), two answers agreeing when
`answers_equivalent` says they are the same value."""

from __future__ import annotations

from collections.abc import Sequence

from yulan_tune.verifiers.math import answers_equivalent


def majority_answer(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(the most common answer, its share of all `answers`); None answers (no answer found) count in the share's
    denominator but never win. Ties go to the answer seen first, so the result does not depend on hash order."""
    groups: list[list[str]] = []  # each group: equivalent answers, its first member the representative
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if answers_equivalent(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None, 0.0
    best = max(groups, key=len)  # max keeps the first of equal lengths
    return best[0], len(best) / len(answers)
