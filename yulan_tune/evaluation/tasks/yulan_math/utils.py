"""The bundled math problems as an lm-evaluation-harness task (`yulan_math.yaml` loads these functions with
`!function`): the 200 held-out problems of `generate_problems(200, seed=0, split="test")`, the same user turn as
`math_messages` (lm-eval renders it with the model's chat template), scored by the same final-answer extraction as
`evaluation.exact_match.math_correct`.

`test.jsonl` next to this file holds the problems, written by `write_math_data` (a test checks it still equals a
fresh generation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from yulan_tune.data.math_problems import MathProblem, extract_answer, generate_problems, math_messages

DATA_FILE = Path(__file__).resolve().parent / "test.jsonl"
NUM_PROBLEMS, SEED, SPLIT = 200, 0, "test"


def math_rows() -> list[dict[str, Any]]:
    """The task's documents, freshly generated (deterministic)."""
    return [{"question": p.question, "answer": p.answer, "solution": p.solution, "operation": p.operation}
            for p in generate_problems(NUM_PROBLEMS, SEED, split=SPLIT)]


def write_math_data(path: str | Path = DATA_FILE) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in math_rows()), encoding="utf-8")
    return path


def load_math(**_metadata: Any) -> dict:
    """`custom_dataset`: the local JSONL as a `datasets.DatasetDict` with one "test" split (no hub access)."""
    import datasets

    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _problem(doc: dict) -> MathProblem:
    return MathProblem(doc["question"], int(doc["answer"]), doc["solution"], doc["operation"])


def doc_to_text(doc: dict) -> str:
    """The user turn of `math_messages`: question and answer-format instruction."""
    (message,) = math_messages(_problem(doc))
    return message["content"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the extracted final integer equals the true answer (`math_correct`'s rule)."""
    return {"exact_match": float(extract_answer(results[0]) == int(doc["answer"]))}
