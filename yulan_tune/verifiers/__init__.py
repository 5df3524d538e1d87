"""Verifiers: deciding whether a generated answer is right without a person.

`math` (final answers by numeric / symbolic equivalence, with HuggingFace's `math-verify`), `arithmetic` (whether
the equations of a worked answer are true), `code` (a candidate
program run against its tests in a subprocess with time and memory limits and no network) and `vote`
(self-consistency: the majority answer where there is no reference). Layer 2: they import `data/` and level 0 only.
"""

from yulan_tune.verifiers.arithmetic import ArithmeticCheck, check_arithmetic
from yulan_tune.verifiers.code import CODE_OUTCOMES, CodeVerdict, network_isolation, run_code_tests
from yulan_tune.verifiers.math import (
    MathVerdict,
    answers_equivalent,
    extract_final_answer,
    is_ambiguous,
    stated_answers,
    verify_math,
)
from yulan_tune.verifiers.vote import majority_answer

__all__ = ["CODE_OUTCOMES", "ArithmeticCheck", "CodeVerdict", "MathVerdict", "answers_equivalent", "check_arithmetic",
           "extract_final_answer",
           "is_ambiguous", "majority_answer", "network_isolation", "run_code_tests", "stated_answers", "verify_math"]
