"""Are the equations a worked answer writes true? A check of the steps, not only of the final answer.

A sampled answer can reach the right final number through a false step: the tiny model writes "7 + 1 = 6. 6 + 2 =
8. The answer is 8." for 7 + 1 + 0, and `verify_math` credits it. Labelling such an answer "right" (on-policy pairs)
or rewarding it in full (RL) teaches the false step. `check_arithmetic` finds every written equation whose left side
is integers joined by + - * / (also × ÷) and whose right side is a number ("12 + 7 = 19", "3 * 4 - 2 = 10",
"7 - -3 = 10", "10 / 4 = 2.5"), evaluates the left side exactly (fractions; * and / before + and -) and reports
the ones that are false. Text between equations is not read, so an equation split over words ("7 plus 1 is 8") is
not checked; a chain "1 + 2 = 3 + 4 = 7" is checked as its first link ("1 + 2 = 3") only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

# integers joined by operators (a unary minus allowed on each), "=", a number; not inside a longer number or word
_EQUATION = re.compile(
    r"(?<![\w.])(-?\d+(?:\s*[-+*/×÷]\s*-?\d+)+)\s*=\s*(-?\d+(?:\.\d+)?)(?![\w]|\.\d)")
_TOKEN = re.compile(r"\d+|[-+*/×÷]")


@dataclass(frozen=True)
class ArithmeticCheck:
    equations: int  # equations found
    false: tuple[str, ...]  # the false ones, as written

    @property
    def all_true(self) -> bool:
        """No false equation (also true when the text writes none: nothing to refute)."""
        return not self.false

    @property
    def share_true(self) -> float | None:
        """The share of true equations; None when there are none."""
        return None if not self.equations else 1.0 - len(self.false) / self.equations


def evaluate_integer_expression(expression: str) -> Fraction | None:
    """The exact value of integers joined by + - * / (× ÷), * and / first; None on division by zero."""
    tokens = _TOKEN.findall(expression)
    operands: list[Fraction] = []
    operators: list[str] = []
    sign = 1
    for token in tokens:
        expecting_operand = len(operands) == len(operators)
        if token.isdigit():
            operands.append(sign * Fraction(int(token)))
            sign = 1
        elif expecting_operand and token == "-":
            sign = -sign  # a unary minus: "7 - -3"
        else:
            operators.append(token)
    # * and / bind tighter: fold them into their left operand first, then add up the terms
    terms, term_signs = [operands[0]], [1]
    for operator, operand in zip(operators, operands[1:]):
        if operator in "*×":
            terms[-1] *= operand
        elif operator in "/÷":
            if operand == 0:
                return None
            terms[-1] /= operand
        else:
            terms.append(operand)
            term_signs.append(1 if operator == "+" else -1)
    return sum((s * t for s, t in zip(term_signs, terms)), Fraction(0))


def check_arithmetic(text: str) -> ArithmeticCheck:
    """Every integer equation in `text` (see the module docstring), and the false ones."""
    found = 0
    false = []
    for match in _EQUATION.finditer(text):
        left, right = match.group(1), match.group(2)
        found += 1
        value = evaluate_integer_expression(left)
        if value is None or value != Fraction(right):
            false.append(match.group(0))
    return ArithmeticCheck(found, tuple(false))
