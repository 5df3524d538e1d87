"""Seeded math word problems with verifiable integer answers: the bundled task that SFT / DPO gains are measured on.

The problems are deliberately small (one or two operations on small numbers) so that a CPU-sized model can learn
the format and part of the arithmetic in minutes; the exact-match metric then moves measurably.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mei", "Noah"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "marbles", "cards", "eggs", "stickers"]

# Operand ranges (inclusive). Small operands: a few hundred arithmetic facts, so a CPU-sized model can learn them
# within the quickstart. `arithmetic_facts` enumerates exactly the facts these ranges can ask for.
ADD_RANGE = (1, 12)
SUB_MINUEND_RANGE = (5, 20)
MUL_RANGE = (2, 6)
ADD_SUB_RANGE = (1, 9)

# split -> seed offset: train and test draw from disjoint seeds AND test questions that also occur in train are dropped
_SPLIT_SEED = {"train": 0, "test": 1_000_003}
# The test split leaves out every question of the first TRAIN_POOL train problems (of the same seed), so a train set
# of at most this many never contains a test question. The question space is small: the first 10000 train problems
# (the quickstart's SFT set) hold 103 of the first 1000 test questions unless they are left out. Leaving them out
# uses up most multiplications (3500 possible questions), so the test split draws each problem's kind first, in the
# generator's shares (KINDS), and then a question of that kind that train does not use. Without that the first 1000
# test problems held 6.4% multiplications and 29% two-step problems; with it 16.5% and 17.7% (the first 10000 train
# problems: 13.9% and 17.9%, fewer multiplications because repeated questions are dropped).
TRAIN_POOL = 30000


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: int
    solution: str  # worked steps ending with "The answer is N."
    operation: str  # "add", "sub", "mul", "add_sub"


KINDS = ["add", "add", "sub", "sub", "mul", "add_sub"]  # drawn uniformly: the kinds' shares of the problems


def _make_problem(rng: random.Random, kind: str | None = None) -> MathProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = kind or rng.choice(KINDS)
    if kind == "add":
        a, b = rng.randint(*ADD_RANGE), rng.randint(*ADD_RANGE)
        answer = a + b
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps = f"{a} + {b} = {answer}."
    elif kind == "sub":
        a = rng.randint(*SUB_MINUEND_RANGE)
        b = rng.randint(1, a)
        answer = a - b
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps = f"{a} - {b} = {answer}."
    elif kind == "mul":
        a, b = rng.randint(*MUL_RANGE), rng.randint(*MUL_RANGE)
        answer = a * b
        question = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?"
        steps = f"{a} * {b} = {answer}."
    else:
        a, b = rng.randint(*ADD_SUB_RANGE), rng.randint(*ADD_SUB_RANGE)
        c = rng.randint(1, a + b)
        answer = a + b - c
        question = f"{name} has {a} {item}, finds {b} more, then loses {c}. How many {item} does {name} have?"
        steps = f"{a} + {b} = {a + b}. {a + b} - {c} = {answer}."
    return MathProblem(question, answer, f"{steps} The answer is {answer}.", kind)


def arithmetic_facts() -> list[str]:
    """Every calculation step the problems can contain, written as in their solutions ("7 + 5 = 12."), each once.

    These are the facts the train split's solutions already hold (2000 train problems state each one several times);
    as a table they are the same knowledge at several times the density per token.
    """
    def pairs(low: int, high: int) -> set[tuple[int, int]]:
        return {(x, y) for x in range(low, high + 1) for y in range(low, high + 1)}

    def differences(minuends: range) -> set[tuple[int, int]]:  # a - b with 1 <= b <= a
        return {(x, y) for x in minuends for y in range(1, x + 1)}

    # "add" and the first step of "add_sub" add; "sub" and the second step of "add_sub" ((a + b) - c) subtract
    adds = pairs(*ADD_RANGE) | pairs(*ADD_SUB_RANGE)
    subs = differences(range(SUB_MINUEND_RANGE[0], SUB_MINUEND_RANGE[1] + 1)) | differences(
        range(2 * ADD_SUB_RANGE[0], 2 * ADD_SUB_RANGE[1] + 1))
    facts = {(x, "+", y) for x, y in adds} | {(x, "-", y) for x, y in subs} | {(x, "*", y) for x, y in pairs(*MUL_RANGE)}
    results = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    return [f"{a} {op} {b} = {results[op](a, b)}." for a, op, b in sorted(facts, key=lambda f: (f[1], f[0], f[2]))]


def solutions(problems: list[MathProblem]) -> list[str]:
    """Each problem's worked solution: the cluster key of a paired comparison (`evaluation.paired`). Problems that
    differ only in names and items share it ("5 * 2 = 10. The answer is 10."), and a model that learns or unlearns
    that arithmetic gains or loses them together."""
    return [p.solution for p in problems]


def generate_problems(n: int, seed: int = 0, split: str = "train") -> list[MathProblem]:
    """`n` distinct problems; the "test" split never repeats a question of the "train" split with the same seed."""
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be one of {sorted(_SPLIT_SEED)}, got {split!r}")
    if split == "train" and n > TRAIN_POOL:
        raise ValueError(f"at most {TRAIN_POOL} train problems: the test split is disjoint from those only, got {n}")
    excluded = _train_questions(seed) if split == "test" else frozenset()
    return _draw(n, random.Random(seed + _SPLIT_SEED[split]), excluded, split)


@functools.lru_cache(maxsize=4)
def _train_questions(seed: int) -> frozenset[str]:
    return frozenset(p.question for p in _draw(TRAIN_POOL, random.Random(seed + _SPLIT_SEED["train"]), frozenset(),
                                               "train"))


def _draw(n: int, rng: random.Random, excluded: frozenset[str], split: str) -> list[MathProblem]:
    """`n` distinct problems whose questions are not in `excluded`; with an exclusion, each problem's kind is drawn
    first and kept while questions are redrawn, so the exclusion does not shift the mix of kinds."""
    problems: list[MathProblem] = []
    seen: set[str] = set()
    attempts = 0
    kind = None
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct {split} problems")
        if excluded and kind is None:
            kind = rng.choice(KINDS)
        problem = _make_problem(rng, kind)
        if problem.question in seen or problem.question in excluded:
            continue
        seen.add(problem.question)
        problems.append(problem)
        kind = None
    return problems


_ANSWER_RE = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The integer after "The answer is", else the last integer in the text, else None."""
    match = _ANSWER_RE.search(text)
    if match:
        return int(match.group(1))
    numbers = _INT_RE.findall(text)
    return int(numbers[-1]) if numbers else None


# The instruction the bundled SFT data pairs with each question (the same text at train and eval time).
MATH_INSTRUCTION = "Solve the problem and end with 'The answer is N.'"


def math_messages(problem: MathProblem) -> list[dict]:
    """The user turn that asks `problem` (the prompt of the bundled SFT, preference and evaluation data)."""
    return [{"role": "user", "content": f"{problem.question}\n{MATH_INSTRUCTION}"}]
