"""Preference data: formats, validation, exact tokenization, and the bundled math preference pairs.

Formats (one row each, from any source `yulan_tune.data.records.iter_records` reads):

- `prompt` / `chosen` / `rejected`: strings, or message lists (trl's conversational form);
- `chosen` / `rejected` as full conversations without `prompt`: the prompt is the longest shared prefix of turns,
  found, not assumed; the two must differ only in their final assistant turn;
- ShareGPT: `conversations` (`from` / `value`) plus `chosen` / `rejected` (a string or one `{from, value}` turn);
- unpaired `prompt` / `completion` / `label` (bool) for KTO.

Every pair is tokenized with the same chat rendering as SFT (`yulan_tune.data.chat`): the prompt is exactly the ids
the model sees at inference (`generation_prompt_ids`), each response is the rest of the rendered conversation (the
assistant turn including its end-of-turn token). A template under which the prompt is not a prefix of the full
rendering fails loudly instead of silently training on a shifted boundary.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from yulan_tune.data.chat import ChatTemplateError, generation_prompt_ids, tokenize_conversation
from yulan_tune.data.formats import check_messages, decode_turns, sharegpt_to_messages
from yulan_tune.data.math_problems import generate_problems, math_messages
from yulan_tune.data.records import DataFormatError, Record, SkipReport, format_where, load_examples

PREFERENCE_FORMATS = ("prompt_chosen_rejected", "implicit_prompt", "sharegpt", "unpaired")
REJECTION_KINDS = ("off_by_one", "wrong_operation", "wrong_final_number", "misread_operand")


@dataclass
class PreferenceExample:
    """A validated pair: the shared `prompt` turns and one final assistant turn each for `chosen` and `rejected`."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: str
    line: int | None
    format: str = "prompt_chosen_rejected"
    unit: Literal["line", "row"] = "line"
    kind: str | None = None  # for bundled pairs: how the rejected answer is wrong

    @property
    def where(self) -> str:
        return format_where(self.source, self.line, self.unit)


@dataclass
class UnpairedExample:
    """A validated KTO row: `prompt` turns, one assistant `completion` turn, desirable (`label=True`) or not."""

    prompt: list[dict]
    completion: list[dict]
    label: bool
    source: str
    line: int | None
    format: str = "unpaired"
    unit: Literal["line", "row"] = "line"

    @property
    def where(self) -> str:
        return format_where(self.source, self.line, self.unit)


# ------------------------------------------------------------------------------------------------------- parsing


def _present(data: dict, key: str) -> bool:
    return key in data and data[key] is not None


def _is_turn_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) for t in value)


def _maybe_json_turns(value: Any) -> Any:
    """CSV stores turn lists as JSON text; decode only text that really is a list of turns (a reply may start with
    '[')."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = decode_turns(value, "", "")
        except DataFormatError:
            return value
        if _is_turn_list(decoded) and all(("role" in t) or ("from" in t) for t in decoded):
            return decoded
    return value


def _as_messages(value: Any, where: str, name: str, *, default_role: str, require_assistant: bool) -> list[dict]:
    """A string (one turn of `default_role`), one turn dict, or a list of turns (OpenAI or ShareGPT keys)."""
    value = _maybe_json_turns(value)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataFormatError(where, f"expected a string or a list of messages, got {type(value).__name__}",
                              field=name, reason="non_string_content")
    if value and isinstance(value[0], dict) and "from" in value[0] and "role" not in value[0]:
        value = sharegpt_to_messages(value, where, name)
    return check_messages(value, where, name, require_assistant=require_assistant)


def _check_prompt(prompt: list[dict], where: str, name: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise DataFormatError(where, "expected a prompt with a non-empty user turn, got "
                              f"{[m['role'] for m in prompt] or 'no turns'}", field=name, reason="no_prompt")
    if prompt[-1]["role"] == "assistant":
        raise DataFormatError(where, "expected the prompt to end with a user/tool turn (the response follows it), "
                              "got a final assistant turn", field=name, reason="no_prompt")


def _check_response(response: list[dict], where: str, name: str) -> None:
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise DataFormatError(where, f"expected exactly one assistant turn, got roles {[m['role'] for m in response]}",
                              field=name, reason="no_assistant_turn")
    if not response[0]["content"].strip():
        raise DataFormatError(where, "expected a non-empty response, got an empty string", field=name,
                              reason="empty_response")


def split_shared_prefix(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], list[dict],
                                                                                        list[dict]]:
    """(prompt, chosen reply, rejected reply) of two full conversations that differ only in the last assistant turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise DataFormatError(where, "expected different responses, got identical conversations", field="chosen",
                              reason="identical_pair")
    if shared == 0:
        raise DataFormatError(where, "expected chosen and rejected to share the prompt turns, they differ from the "
                              "first turn on", field="chosen", reason="no_prompt")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if len(conversation) - shared != 1:
            raise DataFormatError(
                where,
                f"expected chosen and rejected to differ only in their final assistant turn, but they diverge at turn "
                f"{shared} ({conversation[min(shared, len(conversation) - 1)]['role']}) and {name} has "
                f"{len(conversation) - shared} turns after the shared prefix",
                field=f"{name}[{shared}]", reason="diverges_early",
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _parse_label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):  # CSV cells
        return value.strip().lower() in ("true", "1")
    raise DataFormatError(where, f"expected a boolean (true = desirable completion), got {value!r}", field="label",
                          reason="missing_field")


def parse_preference_record(record: Record) -> PreferenceExample | UnpairedExample:
    """Detect the row's preference format, normalize it to chat turns, validate; raise `DataFormatError`."""
    data, where = record.data, record.where
    common = dict(source=record.source, line=record.line, unit=record.unit)

    if _present(data, "label") or (_present(data, "completion") and not _present(data, "chosen")):
        for key in ("prompt", "completion", "label"):
            if not _present(data, key):
                raise DataFormatError(where, "missing (unpaired KTO rows need 'prompt', 'completion' and 'label')",
                                      field=key, reason="missing_field")
        prompt = _as_messages(data["prompt"], where, "prompt", default_role="user", require_assistant=False)
        completion = _as_messages(data["completion"], where, "completion", default_role="assistant",
                                  require_assistant=False)
        _check_prompt(prompt, where, "prompt")
        _check_response(completion, where, "completion")
        return UnpairedExample(prompt, completion, _parse_label(data["label"], where), **common)

    for key in ("chosen", "rejected"):
        if not _present(data, key):
            raise DataFormatError(where, "missing (preference rows need 'chosen' and 'rejected', plus 'prompt' or "
                                  "'conversations' unless both are full conversations)", field=key,
                                  reason="missing_field")
    chosen_raw, rejected_raw = _maybe_json_turns(data["chosen"]), _maybe_json_turns(data["rejected"])

    if _present(data, "conversations"):
        prompt = _as_messages(decode_turns(data["conversations"], where, "conversations"), where, "conversations",
                              default_role="user", require_assistant=False)
        fmt = "sharegpt"
    elif _present(data, "prompt") and not (_is_turn_list(chosen_raw) and _starts_with_user(chosen_raw)):
        prompt = _as_messages(data["prompt"], where, "prompt", default_role="user", require_assistant=False)
        fmt = "prompt_chosen_rejected"
    else:  # full conversations (a redundant `prompt` column repeated inside them is ignored)
        if not (_is_turn_list(chosen_raw) and _is_turn_list(rejected_raw)):
            raise DataFormatError(where, "missing: without it, 'chosen' and 'rejected' must be full conversations "
                                  "(lists of turns)", field="prompt", reason="no_prompt")
        chosen = _as_messages(chosen_raw, where, "chosen", default_role="assistant", require_assistant=False)
        rejected = _as_messages(rejected_raw, where, "rejected", default_role="assistant", require_assistant=False)
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected, where)
        return _validated_pair(prompt, chosen, rejected, where, "implicit_prompt", common)

    chosen = _as_messages(chosen_raw, where, "chosen", default_role="assistant", require_assistant=False)
    rejected = _as_messages(rejected_raw, where, "rejected", default_role="assistant", require_assistant=False)
    return _validated_pair(prompt, chosen, rejected, where, fmt, common)


def _starts_with_user(turns: list[dict]) -> bool:
    first = turns[0]
    return first.get("role", first.get("from")) in ("system", "user", "human")


def _validated_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], where: str, fmt: str,
                    common: dict) -> PreferenceExample:
    _check_prompt(prompt, where, "prompt")
    _check_response(chosen, where, "chosen")
    _check_response(rejected, where, "rejected")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise DataFormatError(where, "expected different responses, got the same text for chosen and rejected",
                              field="rejected", reason="identical_pair")
    return PreferenceExample(prompt, chosen, rejected, format=fmt, **common)


def load_preference_examples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_bad_rows: str = "raise",
    split: str = "train",
    columns: Mapping[str, str] | None = None,
) -> tuple[list[PreferenceExample | UnpairedExample], SkipReport]:
    """All rows of `source` parsed and validated, columns renamed by `columns` (e.g. {"chosen": "chosen_messages",
    "rejected": "rejected_messages"}), under the bad-row policy (`yulan_tune.data.records`)."""
    return load_examples(source, parse_preference_record, on_bad_rows=on_bad_rows, split=split, columns=columns)


def unpair(examples: Sequence[PreferenceExample | UnpairedExample]) -> list[UnpairedExample]:
    """KTO rows from pairs: chosen is a desirable completion, rejected an undesirable one (both kept)."""
    rows: list[UnpairedExample] = []
    for e in examples:
        if isinstance(e, UnpairedExample):
            rows.append(e)
            continue
        for completion, label in ((e.chosen, True), (e.rejected, False)):
            rows.append(UnpairedExample(e.prompt, completion, label, e.source, e.line, e.format, e.unit))
    return rows


# -------------------------------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedPreferences:
    """Token ids per row (trl's pre-tokenized column names) and the counts of what was changed or dropped."""

    columns: dict[str, list] = field(default_factory=dict)
    report: SkipReport = field(default_factory=SkipReport)
    kept: list[Any] = field(default_factory=list)  # the examples behind each row, for evaluation and reports

    def __len__(self) -> int:
        return len(self.kept)

    def to_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_dict(self.columns)


def response_ids(tokenizer: Any, prompt: list[dict], response: list[dict], prompt_ids: list[int],
                 where: str = "") -> list[int]:
    """The tokens that follow `prompt_ids` when `prompt + response` is rendered and tokenized exactly as in SFT."""
    full = tokenize_conversation(tokenizer, prompt + response).input_ids
    if full[: len(prompt_ids)] != prompt_ids:
        raise ChatTemplateError(
            f"{where}: the generation prompt is not a token prefix of the rendered conversation (the chat template "
            "renders the prompt differently before a reply, or a token merges across the boundary), so prompt and "
            "response cannot be split exactly"
        )
    return full[len(prompt_ids):]


REJECTED_SPANS = ("full", "first_difference")


def cut_at_first_difference(chosen: list[int], rejected: list[int]) -> list[int]:
    """`rejected` up to and including its first token that differs from `chosen` (unchanged if none differs).

    A worked answer that goes wrong at one step carries the mistake on consistently ("14 - 8 = 5. The answer is
    5."): every token after the first wrong one is right *given* it. DPO on the whole rejected response lowers those
    tokens too, and so unlearns true facts and carrying a result forward (docs/tiny_model.md). Cut after the first
    difference, the rejected side holds only the mistake (the shared prefix cancels in DPO's log-ratio difference),
    while the chosen side keeps the whole correct answer. This is the step-level preference of Step-DPO (Lai et al.
    2024, arXiv 2406.18629) at the granularity of one token: it assumes the first difference is the mistake, which
    holds for answers in a fixed worked format, not for two freely written replies.
    """
    first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    return rejected if first is None else rejected[: first + 1]


def tokenize_preferences(
    examples: Sequence[PreferenceExample | UnpairedExample],
    tokenizer: Any,
    *,
    max_length: int | None,
    overlong: Literal["drop", "truncate"] = "drop",
    rejected_span: Literal["full", "first_difference"] = "full",
    report: SkipReport | None = None,
) -> TokenizedPreferences:
    """Pairs -> prompt_ids / chosen_ids / rejected_ids; unpaired rows -> prompt_ids / completion_ids / label.

    Rows longer than `max_length` (prompt + longer response) are dropped ("too_long_dropped") or their responses cut
    ("too_long_truncated"; a prompt that fills `max_length` alone is still dropped, and a pair whose responses become
    identical when cut is dropped as "identical_after_truncation": it would carry no preference). Dropping is the
    default because the tokens that decide a preference are often the last ones (the final answer).
    `rejected_span="first_difference"` cuts each rejected response after its first token that differs from the
    chosen one (`cut_at_first_difference`; counted as "rejected_cut_at_first_difference"), before the length check.
    """
    if rejected_span not in REJECTED_SPANS:
        raise ValueError(f"rejected_span must be one of {REJECTED_SPANS}, got {rejected_span!r}")
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    out = TokenizedPreferences(report=report if report is not None else SkipReport())
    paired = bool(examples) and isinstance(examples[0], PreferenceExample)
    names = ("chosen_ids", "rejected_ids") if paired else ("completion_ids",)
    out.columns = {"prompt_ids": [], **{name: [] for name in names}, **({} if paired else {"label": []})}
    for example in examples:
        if isinstance(example, PreferenceExample) != paired:
            raise DataFormatError(example.where, "expected every row to be a pair (chosen/rejected) or every row "
                                  "unpaired (completion/label), got a mix", reason="mixed_formats")
        prompt_ids = generation_prompt_ids(tokenizer, example.prompt)
        responses = (example.chosen, example.rejected) if paired else (example.completion,)
        ids = [response_ids(tokenizer, example.prompt, r, prompt_ids, example.where) for r in responses]
        if paired and rejected_span == "first_difference":
            rejected = cut_at_first_difference(*ids)
            if len(rejected) < len(ids[1]):
                out.report.add("rejected_cut_at_first_difference", example.where,
                               f"{len(ids[1])} -> {len(rejected)} tokens")
                ids[1] = rejected
        length = len(prompt_ids) + max(map(len, ids))
        if max_length is not None and length > max_length:
            room = max_length - len(prompt_ids)
            if overlong == "drop" or room <= 0:
                out.report.add("too_long_dropped", example.where, f"{length} tokens > max_length {max_length}")
                continue
            ids = [r[:room] for r in ids]
            if paired and ids[0] == ids[1]:
                out.report.add("identical_after_truncation", example.where,
                               f"responses identical in their first {room} tokens")
                continue
            out.report.add("too_long_truncated", example.where, f"{length} tokens cut to {max_length}")
        out.columns["prompt_ids"].append(prompt_ids)
        for name, response in zip(names, ids):
            out.columns[name].append(response)
        if not paired:
            out.columns["label"].append(example.label)
        out.kept.append(example)
    return out


# ------------------------------------------------------------------------------- bundled math preference pairs

_STEP = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# a plausible slip for each operation: the inverse for + and -, repeated addition mistaken for * -> +
_WRONG_OPERATION = {"+": "-", "-": "+", "*": "+"}


def wrong_solution(problem: Any, kind: str, rng: random.Random) -> str:
    """A plausible wrong worked answer to `problem` (a `MathProblem`), ending with a wrong "The answer is N.".

    kinds: "off_by_one" (the last step's result is 1 off, carried into the answer), "wrong_operation" (the last step
    applies the wrong operation, consistently worked out), "wrong_final_number" (every step right, then a different
    number is reported, often one copied from the question), "misread_operand" (the first number is copied wrong
    from the question, 1 or 2 off, and every step is then worked out consistently from it: the tiny SFT model of
    `make dpo-quickstart` copies an operand wrong in 39% of its held-out answers, and miscomputes a step in 66%).
    """
    steps = _STEP.findall(problem.solution)
    if not steps:
        raise ValueError(f"cannot parse the worked steps of {problem.solution!r}")
    if kind == "misread_operand":
        return _misread_operand(problem, steps, rng)
    a, op, b, _ = steps[-1]
    head = problem.solution[: problem.solution.rfind(f"{a} {op} {b} =")]
    if kind == "off_by_one":
        wrong = problem.answer + rng.choice((-1, 1))
        return f"{head}{a} {op} {b} = {wrong}. The answer is {wrong}."
    if kind == "wrong_operation":
        wrong_op = _WRONG_OPERATION[op]
        wrong = _APPLY[wrong_op](int(a), int(b))
        if wrong == problem.answer:  # e.g. 2 * 2 = 2 + 2: the slip would not change the answer
            return wrong_solution(problem, "off_by_one", rng)
        return f"{head}{a} {wrong_op} {b} = {wrong}. The answer is {wrong}."
    if kind == "wrong_final_number":
        worked = problem.solution[: problem.solution.rfind("The answer is")]
        # numbers the solver had in hand: operands, and intermediate results of earlier steps
        numbers = {int(s[0]) for s in steps} | {int(s[2]) for s in steps} | {int(s[3]) for s in steps[:-1]}
        numbers -= {problem.answer}
        candidates = sorted(numbers) or [problem.answer + 2]
        wrong = rng.choice(candidates)
        return f"{worked}The answer is {wrong}."
    raise ValueError(f"kind must be one of {REJECTION_KINDS}, got {kind!r}")


def _misread_operand(problem: Any, steps: list[tuple[str, str, str, str]], rng: random.Random) -> str:
    first = int(steps[0][0])
    for delta in rng.sample((-2, -1, 1, 2), 4):
        if first + delta < 0:
            continue
        worked, carried, previous = [], None, None
        for i, (a, op, b, result) in enumerate(steps):
            # a step that continues from the previous result keeps doing so with the misread value
            left = first + delta if i == 0 else (carried if int(a) == previous else int(a))
            previous, carried = int(result), _APPLY[op](left, int(b))
            worked.append(f"{left} {op} {b} = {carried}.")
        if carried != problem.answer:
            return f"{' '.join(worked)} The answer is {carried}."
    raise ValueError(f"no misread operand of {problem.solution!r} changes its answer")


def math_preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[PreferenceExample]:
    """`n` pairs on the generated math problems: chosen = the correct worked solution, rejected = a plausible wrong
    one, the kinds of mistake of REJECTION_KINDS in turn. The "test" split uses held-out problems (never in the train split)."""
    rng = random.Random(f"preferences-{seed}-{split}")
    pairs = []
    for index, problem in enumerate(generate_problems(n, seed, split)):
        kind = REJECTION_KINDS[index % len(REJECTION_KINDS)]
        pairs.append(PreferenceExample(
            prompt=math_messages(problem),
            chosen=[{"role": "assistant", "content": problem.solution}],
            rejected=[{"role": "assistant", "content": wrong_solution(problem, kind, rng)}],
            source=f"bundled:math_preferences:{split}", line=index, unit="row", format="prompt_chosen_rejected",
            kind=kind,
        ))
    return pairs
