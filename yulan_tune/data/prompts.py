"""Prompts with optional verifiable references: the input of RL (`yulan-tune grpo`) and of on-policy preference data
(`yulan-tune pairs`).

A row has a prompt (`prompt`: a string or a list of messages ending in a user turn; or `messages` / `conversations`,
whose final assistant turn, if any, is dropped; or `question`), and optionally `answer` (a math reference, checked by
`verifiers.math`) and `tests` (Python tests for code, run only on explicit opt-in). `bundled:math_chat` gives the
bundled math problems with their answers (`data.math_problems`, train split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from yulan_tune.data.bundled import MATH_CHAT, check_bundled, is_bundled
from yulan_tune.data.formats import check_messages, sharegpt_to_messages
from yulan_tune.data.math_problems import generate_problems, math_messages
from yulan_tune.data.records import DataFormatError, Record, SkipReport, format_where, load_examples


@dataclass(frozen=True)
class PromptExample:
    prompt: list[dict]
    answer: str | None
    tests: str | None
    source: str
    line: int | None
    unit: str = "line"

    @property
    def where(self) -> str:
        return format_where(self.source, self.line, self.unit)


def _turns(value, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(where, "expected a non-empty prompt", field=name, reason="no_prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataFormatError(where, f"expected a string or a list of messages, got {type(value).__name__}",
                              field=name, reason="no_prompt")
    if isinstance(value[0], dict) and "from" in value[0] and "role" not in value[0]:
        value = sharegpt_to_messages(value, where, name)
    return check_messages(value, where, name, require_assistant=False)


def parse_prompt_record(record: Record) -> PromptExample:
    data, where = record.data, record.where
    for name in ("prompt", "messages", "conversations", "question"):
        if data.get(name) not in (None, ""):
            prompt = _turns(data[name], where, name)
            break
    else:
        raise DataFormatError(where, "expected a 'prompt' (string or messages), 'messages', 'conversations' or "
                              f"'question' field, got fields {sorted(data)}", reason="no_prompt")
    if name in ("messages", "conversations") and prompt[-1]["role"] == "assistant":
        prompt = prompt[:-1]  # a full conversation: its last answer is what the model will produce
    if not prompt or prompt[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in prompt):
        raise DataFormatError(where, "expected the prompt to end with a user turn", field=name, reason="no_prompt")
    answer, tests = data.get("answer"), data.get("tests")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataFormatError(where, f"expected a string or number, got {type(answer).__name__}", field="answer",
                              reason="bad_answer")
    if tests is not None and not isinstance(tests, str):
        raise DataFormatError(where, f"expected Python test code as a string, got {type(tests).__name__}",
                              field="tests", reason="bad_tests")
    return PromptExample(prompt, None if answer in (None, "") else str(answer), tests or None, record.source,
                         record.line, record.unit)


def math_prompts(n: int, seed: int = 0, split: str = "train", first: int = 0) -> list[PromptExample]:
    """`n` bundled math problems from the `first`-th on (the problem sequence of `seed` and `split` does not depend on
    how many are drawn) as prompts with their integer answers; each row is numbered by its place in that sequence."""
    return [PromptExample(math_messages(p), str(p.answer), None, MATH_CHAT, first + i, "row")
            for i, p in enumerate(generate_problems(first + n, seed, split)[first:])]


def load_prompts(source: str | os.PathLike | Sequence[str | os.PathLike], *, on_bad_rows: str = "raise",
                 split: str = "train", columns: Mapping[str, str] | None = None, num_bundled: int = 1000,
                 seed: int = 0, first_bundled: int = 0) -> tuple[list[PromptExample], SkipReport]:
    """Every prompt row of `source` validated under the bad-row policy, or `num_bundled` bundled math problems from
    the `first_bundled`-th train problem on."""
    if isinstance(source, str) and is_bundled(source):
        check_bundled(source, (MATH_CHAT,), "prompts")
        return math_prompts(num_bundled, seed, first=first_bundled), SkipReport()
    return load_examples(source, parse_prompt_record, on_bad_rows=on_bad_rows, split=split, columns=columns)
