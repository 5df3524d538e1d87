"""The verifiers: math answers (extraction, numeric / symbolic equivalence, the bundled preference pairs), the code
sandbox (every outcome it can report) and self-consistency voting."""

from __future__ import annotations

import pytest

from yulan_tune.data.math_problems import generate_problems
from yulan_tune.data.preferences import REJECTION_KINDS, math_preference_pairs
from yulan_tune.verifiers import (
    CODE_OUTCOMES,
    answers_equivalent,
    check_arithmetic,
    extract_final_answer,
    majority_answer,
    network_isolation,
    run_code_tests,
    verify_math,
)

# ------------------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("so we get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}} here", "\\sqrt{\\frac{a}{b}}"),
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),
    ("The answer is $3.5$.", "3.5"),
    ("The answer is 3.5. Done", "3.5"),
    ("the final answer is: 1,000", "1,000"),
    ("I think 4, no wait, 12 apples", "12"),
    ("total is 3/4 of it", "3/4"),
    ("no numbers here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("predicted, reference, equal", [
    ("12", "12", True), ("12", "13", False), ("-3", "-3", True), ("1,000", "1000", True), ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.5", True), ("\\frac{3}{4}", "0.75", True), ("2.50", "2.5", True), ("7", "7.0", True),
    ("(x+1)^2", "x^2+2x+1", True), ("x^2+2x", "x^2+2x+1", False), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\pi", "3.14", False),
])
def test_answers_equivalent(predicted, reference, equal):
    assert answers_equivalent(predicted, reference) is equal


def test_verify_math_reasons():
    assert verify_math("4 + 8 = 12. The answer is 12.", 12) == verify_math("\\boxed{12}", "12")
    assert verify_math("\\boxed{12}", "12").correct and verify_math("\\boxed{12}", 12).reason == "correct"
    wrong = verify_math("The answer is 11.", 12)
    assert (wrong.correct, wrong.reason, wrong.extracted) == (False, "wrong answer", "11")
    assert verify_math("I do not know.", 12).reason == "no answer"
    # ran on past its answer into another one: not credited, whichever is right
    ran_on = verify_math("4 + 8 = 12. The answer is 12.lias. The answer is 5.", 12)
    assert (ran_on.correct, ran_on.reason, ran_on.extracted) == (False, "ambiguous answer", "5")
    assert verify_math("The answer is 12. So the answer is 12.0.", 12).correct
    assert verify_math("the answer is 3? No: \\boxed{12}", 12).correct  # a boxed answer outranks the prose


@pytest.mark.parametrize("split, n", [("train", 1000), ("test", 200)])  # dpo_tiny.yaml's pair counts
def test_math_verifier_separates_every_bundled_preference_pair(split, n):
    pairs = math_preference_pairs(n, seed=0, split=split)
    kinds = {pair.kind for pair in pairs}
    assert kinds == set(REJECTION_KINDS)
    references = {pair.line: problem.answer for pair, problem in zip(pairs, generate_problems(n, 0, split))}
    wrongly_rejected = [p.line for p in pairs if not verify_math(p.chosen[-1]["content"], references[p.line]).correct]
    wrongly_accepted = [p.line for p in pairs if verify_math(p.rejected[-1]["content"], references[p.line]).correct]
    assert wrongly_rejected == [] and wrongly_accepted == []


# ------------------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize("text, equations, false", [
    ("12 + 7 = 19. 19 - 5 = 14. The answer is 14.", 2, []),
    ("7 + 1 = 6. 6 + 2 = 8. The answer is 8.", 2, ["7 + 1 = 6"]),  # right answer, false first step
    ("3 * 4 - 2 = 10 and 2 + 3 * 4 = 14", 2, []),  # * before -, * before +
    ("2 + 3 * 4 = 20", 1, ["2 + 3 * 4 = 20"]),  # left to right would make it true
    ("7 - -3 = 10, -4 + 6 = 2, 10 / 4 = 2.5, 9 ÷ 3 × 2 = 6", 4, []),
    ("1 / 0 = 0", 1, ["1 / 0 = 0"]),
    ("6*7=42.", 1, []),
    ("1.5 + 2 = 3.5", 0, []),  # decimals on the left are not read (not this checker's format)
    ("version 2 + 3 = 51", 1, ["2 + 3 = 51"]),
    ("x2 + 3 = 5 and 2 + 3 = 5x", 0, []),  # inside words: not equations
    ("1 + 2 = 3 + 4 = 7", 1, []),  # a chain: its first link
    ("The answer is 7.", 0, []),
    ("", 0, []),
])
def test_check_arithmetic(text, equations, false):
    check = check_arithmetic(text)
    assert (check.equations, list(check.false)) == (equations, false)
    assert check.all_true is (not false)
    assert check.share_true == (None if not equations else 1 - len(false) / equations)


def test_every_bundled_solution_is_true_and_arithmetic_mistakes_are_caught():
    problems = generate_problems(1000, 0, "train")
    assert all(check_arithmetic(p.solution).all_true and check_arithmetic(p.solution).equations for p in problems)
    pairs = math_preference_pairs(1000, seed=0, split="train")
    # the off-by-one mistake writes a false equation; a misread operand or a wrong reported number are worked out
    # truly (the checker reads steps, not whether they fit the question); so is a wrong operation, except where it
    # would not change the answer (2 * 2 = 2 + 2) and the generator falls back to off by one
    checks = {kind: [check_arithmetic(p.rejected[-1]["content"]).all_true for p in pairs if p.kind == kind]
              for kind in REJECTION_KINDS}
    assert not any(checks["off_by_one"]) and all(checks["misread_operand"]) and all(checks["wrong_final_number"])
    assert 0 < len(checks["wrong_operation"]) - sum(checks["wrong_operation"]) < len(checks["wrong_operation"]) / 20


# ------------------------------------------------------------------------------------------------------ code

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
CANDIDATES = {
    "correct": ("def add(a, b):\n    return a + b\n", "passed"),
    "wrong": ("def add(a, b):\n    return a - b\n", "failed"),
    "crashing": ("def add(a, b):\n    return a + undefined_name\n", "error"),
    "syntax error": ("def add(a, b) return a\n", "error"),
    "exits early": ("import sys\nsys.exit(0)\n", "error"),
    "exits hard": ("import os\nos._exit(0)\n", "error"),
    "starts a process": ("import subprocess\ndef add(a, b):\n    subprocess.run(['true'])\n    return a + b\n", "error"),
    "endless loop": ("def add(a, b):\n    while True:\n        pass\n", "timeout"),
    "memory-hungry": ("def add(a, b):\n    block = bytearray(4 * 1024**3)\n    return a + b\n", "memory"),
    "memory-hungry, growing": ("def add(a, b):\n    blocks = []\n    while True:\n        blocks.append(' ' * 2**20)\n",
                               "memory"),
    "network": ("import urllib.request\ndef add(a, b):\n    urllib.request.urlopen('http://127.0.0.1:9/', timeout=1)\n"
                "    return a + b\n", "network"),
    "network, error swallowed": ("import socket\ndef add(a, b):\n    try:\n        socket.socket().connect(('127.0.0.1', 9))\n"
                                 "    except Exception:\n        pass\n    return a + b\n", "network"),
}


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_code_verifier_classifies_candidates(name):
    program, expected = CANDIDATES[name]
    verdict = run_code_tests(program, ADD_TESTS, timeout_s=2.0, memory_mb=256)
    assert verdict.outcome in CODE_OUTCOMES
    assert (verdict.outcome, verdict.passed) == (expected, expected == "passed"), verdict.detail
    assert "\n" not in verdict.detail


def test_code_verifier_runs_in_a_fresh_directory_and_keeps_main_blocks_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text("x")
    program = ("import os\nSEEN = sorted(os.listdir('.'))\nif __name__ == '__main__':\n"
               "    raise RuntimeError('main block ran')\n")
    verdict = run_code_tests(program, "assert 'secret.txt' not in SEEN, SEEN\n")
    assert verdict.passed, verdict.detail
    assert network_isolation() in ("network namespace + audit hook", "audit hook")


def test_code_verifier_rejects_bad_limits():
    with pytest.raises(ValueError, match="positive"):
        run_code_tests("x = 1", "", timeout_s=0)


# ------------------------------------------------------------------------------------------------------ vote


def test_majority_answer():
    assert majority_answer(["12", "0.5", "12.0", None, "1/2", "\\frac{1}{2}"]) == ("0.5", 0.5)
    assert majority_answer(["3", "4"]) == ("3", 0.5)  # a tie goes to the first seen
    assert majority_answer([None, None]) == (None, 0.0)
    assert majority_answer([]) == (None, 0.0)
