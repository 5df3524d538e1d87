"""Math answers: the final answer of a worked solution, and whether two answers are the same number or expression.

`extract_final_answer` reads, in this order, the last `\\boxed{...}` (braces nested to any depth; YuLan's long-CoT
synthesis asks for boxed answers, docs/yulan_reference.md section 5), the last "The answer is X" (the bundled math
data's convention, `data.math_problems.MATH_INSTRUCTION`), else the last number in the text. `verify_math` credits
no completion that states two different final answers (a sampled tiny model often runs on past "The answer is 8."
into "... The answer is 5."; the held-out metric, `data.math_problems.extract_answer`, reads the first statement).

`answers_equivalent` compares exactly where both sides are plain numbers (integers, decimals, fractions, with
thousands separators: the common case, decided without sympy), and otherwise through `math-verify` (LaTeX and plain
expressions parsed to sympy, compared numerically and symbolically: 1/2 = 0.5 = \\frac{1}{2}, (x+1)^2 = x^2+2x+1).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

MATH_REASONS = ("correct", "wrong answer", "no answer", "ambiguous answer")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")
_LATEX_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
# math-verify bounds its own parse / compare time with signal.alarm, which exists in the main thread only
MATH_VERIFY_TIMEOUT_S = 5


@dataclass(frozen=True)
class MathVerdict:
    correct: bool
    reason: str  # one of MATH_REASONS
    extracted: str | None  # the final answer read from the completion


def _boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...} in `text`, braces matched (an unclosed one is ignored)."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                found.append(text[start:position])
                break
    return found


def _clean(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"^\\\(|\\\)$", "", answer).strip()  # \( ... \)
    return answer.rstrip(".").strip()


def stated_answers(text: str) -> list[str]:
    """Every explicit final-answer statement of a completion, in order: its \\boxed{...} contents if it has any,
    else its "The answer is X" statements (empty when it has neither)."""
    boxed = [_clean(b) for b in _boxed_contents(text)]
    if any(boxed):
        return [b for b in boxed if b]
    return [_clean(s) for s in _ANSWER_IS.findall(text) if _clean(s)]


def extract_final_answer(text: str) -> str | None:
    """The final answer of a completion: last \\boxed{...}, else last "The answer is X", else the last number."""
    stated = stated_answers(text)
    if stated:
        return stated[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def is_ambiguous(text: str) -> bool:
    """Whether a completion states two different final answers (a model that runs on past its answer and states
    another, or changes its mind): then no single answer can be credited to it."""
    stated = stated_answers(text)
    return any(not answers_equivalent(other, stated[0]) for other in stated[1:])


def _as_fraction(answer: str) -> Fraction | None:
    """`answer` as an exact number if it is a plain one ("12", "-3.5", "1,000", "3/4", "\\frac{3}{4}"), else None."""
    text = answer.strip().strip("$").replace(" ", "").replace("\\!", "").rstrip(".")
    latex = _LATEX_FRACTION.match(text)
    if latex:
        sign, numerator, denominator = latex.groups()
        text = f"{sign}{numerator}/{denominator}"
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(predicted: str, reference: str) -> bool:
    from math_verify import parse, verify  # imported on first use: it loads sympy and an ANTLR LaTeX parser

    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout) or parse(reference, parsing_timeout=timeout)
    target = parse(f"${predicted}$", parsing_timeout=timeout) or parse(predicted, parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout))


def answers_equivalent(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same value: exactly for plain numbers, else numerically / symbolically."""
    if predicted is None or reference is None:
        return False
    predicted, reference = str(predicted), str(reference)
    if _clean(predicted).replace(" ", "") == _clean(reference).replace(" ", ""):
        return True
    exact = _as_fraction(predicted), _as_fraction(reference)
    if exact[0] is not None and exact[1] is not None:
        return exact[0] == exact[1]
    return _math_verify_equal(_clean(predicted), _clean(reference))


def verify_math(completion: str, reference: str | int | float) -> MathVerdict:
    """Whether the final answer of `completion` equals `reference`: "correct", "wrong answer", "no answer", or
    "ambiguous answer" (two different final answers stated, `is_ambiguous`; never credited, even if one is right)."""
    extracted = extract_final_answer(completion)
    if extracted is None:
        return MathVerdict(False, "no answer", None)
    if is_ambiguous(completion):
        return MathVerdict(False, "ambiguous answer", extracted)
    if answers_equivalent(extracted, str(reference)):
        return MathVerdict(True, "correct", extracted)
    return MathVerdict(False, "wrong answer", extracted)
