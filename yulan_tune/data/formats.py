"""SFT dataset formats: every common chat layout normalized to chat `messages` (or plain `text`), validated.

Formats: OpenAI `messages`, ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion`,
plain `text`. Rows come from `yulan_tune.data.records` (any file type, directory, saved or hub dataset) and keep
their location, so each error (here, or in tokenization: too long, no trainable token) says file, line, field and
what was expected.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from yulan_tune.conventions import IGNORE_INDEX
from yulan_tune.data.chat import tokenize_conversation, tokenize_text
from yulan_tune.data.records import DataFormatError, Record, SkipReport, format_where, load_examples

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles ("human"/"gpt" is the original ShareGPT spelling; some dumps use the
# OpenAI names inside `from`, LLaMA-Factory uses "observation" for tool results)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
}
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


@dataclass
class SFTExample:
    """A validated SFT sample: exactly one of `messages` ([{"role", "content"}], roles in ROLES) or `text`."""

    messages: list[dict] | None
    text: str | None
    source: str
    line: int | None
    format: str = "messages"
    unit: Literal["line", "row"] = "line"

    @property
    def where(self) -> str:
        return format_where(self.source, self.line, self.unit)



# ------------------------------------------------------------------------------------------------- parsing SFT rows


def parse_sft_record(record: Record) -> SFTExample:
    """Detect the row's format and normalize it to chat `messages` (or plain `text`); raise `DataFormatError`."""
    data, where = record.data, record.where

    def example(messages: list[dict] | None, text: str | None, fmt: str) -> SFTExample:
        return SFTExample(messages, text, record.source, record.line, fmt, record.unit)

    if _present(data, "messages"):
        return example(check_messages(decode_turns(data["messages"], where, "messages"), where, "messages"), None,
                       "messages")
    if _present(data, "conversations"):
        turns = decode_turns(data["conversations"], where, "conversations")
        if turns and isinstance(turns[0], dict) and "role" in turns[0] and "from" not in turns[0]:
            return example(check_messages(turns, where, "conversations"), None, "messages")
        return example(check_messages(sharegpt_to_messages(turns, where), where, "conversations"), None,
                       "sharegpt")
    if _present(data, "instruction"):
        return example(_alpaca_to_messages(data, where), None, "alpaca")
    if _present(data, "prompt") or _present(data, "completion"):
        return example(_prompt_completion_to_messages(data, where), None, "prompt_completion")
    if _present(data, "text"):
        text = data["text"]
        if not isinstance(text, str):
            raise DataFormatError(where, f"expected a string, got {type(text).__name__}", field="text",
                                  reason="non_string_content")
        if not text.strip():
            raise DataFormatError(where, "expected non-empty text, got an empty string", field="text",
                                  reason="empty_text")
        return example(None, text, "text")
    raise DataFormatError(
        where,
        "no known format: expected a field 'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
        f"'prompt'+'completion' or 'text'; got fields {sorted(k for k, v in data.items() if v is not None)}",
        reason="unknown_format",
    )


def _present(data: dict, key: str) -> bool:
    return key in data and data[key] is not None


def decode_turns(value: Any, where: str, name: str) -> list:
    """A list of turns; CSV (and some Parquet exports) store it as JSON text, which is decoded here."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataFormatError(where, f"expected a list of turns or its JSON text, got unparsable text "
                                  f"({error.msg})", field=name, reason="invalid_json") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DataFormatError(where, f"expected a list of turns, got {type(value).__name__}", field=name,
                              reason="missing_field")
    return value


def check_messages(messages: list, where: str, name: str, *, require_assistant: bool = True) -> list[dict]:
    """Validated copy of a chat: a non-empty list of {"role", "content"} turns, known roles, string contents."""
    if not messages:
        raise DataFormatError(where, "expected a non-empty list of turns, got []", field=name,
                              reason="empty_conversation")
    normalized = []
    for index, message in enumerate(messages):
        prefix = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise DataFormatError(where, f"expected an object with 'role' and 'content', got {type(message).__name__}",
                                  field=prefix, reason="missing_field")
        for key in ("role", "content"):
            if key not in message:
                raise DataFormatError(where, f"missing; the turn has fields {sorted(message)}",
                                      field=f"{prefix}.{key}", reason="missing_field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataFormatError(where, f"expected one of {'/'.join(ROLES)}, got {role!r}", field=f"{prefix}.role",
                                  reason="unknown_role")
        if isinstance(content, (list, tuple)):
            content = join_text_parts(content, where, f"{prefix}.content")
        if not isinstance(content, str):
            raise DataFormatError(where, f"expected a string, got {type(content).__name__}",
                                  field=f"{prefix}.content", reason="non_string_content")
        normalized.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in normalized):
        raise DataFormatError(where, "expected at least one assistant turn (nothing to train on), got roles "
                              f"{[m['role'] for m in normalized]}", field=name, reason="no_assistant_turn")
    return normalized


def join_text_parts(parts: list | tuple, where: str, name: str) -> str:
    """Content given as a list of parts (the OpenAI and Hugging Face layout, `[{"type": "text", "text": ...}]`) as one
    string: text parts concatenated in order, as Hugging Face chat templates render them. Any other part (an image,
    audio) is refused: the YuLan models read text only."""
    texts = []
    for index, part in enumerate(parts):
        field_name = f"{name}[{index}]"
        if not isinstance(part, dict):
            raise DataFormatError(where, f"expected a content part {{'type': 'text', 'text': ...}}, got "
                                  f"{type(part).__name__}", field=field_name, reason="non_string_content")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise DataFormatError(where, f"expected a text part, got type {kind!r} (YuLan models read text only)",
                                  field=f"{field_name}.type", reason="non_text_content")
        if not isinstance(part.get("text"), str):
            raise DataFormatError(where, f"expected a string, got {type(part.get('text')).__name__}",
                                  field=f"{field_name}.text", reason="non_string_content")
        texts.append(part["text"])
    return "".join(texts)


def sharegpt_to_messages(turns: list, where: str, name: str = "conversations") -> list[dict]:
    """ShareGPT turns ({"from", "value"}) as chat messages; speaker names are mapped by SHAREGPT_ROLES."""
    messages = []
    for index, turn in enumerate(turns):
        prefix = f"{name}[{index}]"
        if not isinstance(turn, dict):
            raise DataFormatError(where, f"expected an object with 'from' and 'value', got {type(turn).__name__}",
                                  field=prefix, reason="missing_field")
        for key in ("from", "value"):
            if key not in turn:
                raise DataFormatError(where, f"missing; the turn has fields {sorted(turn)}", field=f"{prefix}.{key}",
                                      reason="missing_field")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise DataFormatError(where, f"expected one of {'/'.join(SHAREGPT_ROLES)}, got {speaker!r}",
                                  field=f"{prefix}.from", reason="unknown_role")
        if not isinstance(turn["value"], str):
            raise DataFormatError(where, f"expected a string, got {type(turn['value']).__name__}",
                                  field=f"{prefix}.value", reason="non_string_content")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def _alpaca_to_messages(data: dict, where: str) -> list[dict]:
    for key in ("instruction", "output"):
        if not _present(data, key):
            raise DataFormatError(where, "missing (Alpaca rows need 'instruction' and 'output', 'input' is optional)",
                                  field=key, reason="missing_field")
    for key in ("instruction", "input", "output", "system"):
        if _present(data, key) and not isinstance(data[key], str):
            raise DataFormatError(where, f"expected a string, got {type(data[key]).__name__}", field=key,
                                  reason="non_string_content")
    # Alpaca's own prompt puts the input after the instruction; a blank line keeps them apart
    prompt = data["instruction"] if not data.get("input") else f"{data['instruction']}\n\n{data['input']}"
    messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]


def _prompt_completion_to_messages(data: dict, where: str) -> list[dict]:
    for key in ("prompt", "completion"):
        if not _present(data, key):
            raise DataFormatError(where, "missing (prompt/completion rows need both)", field=key,
                                  reason="missing_field")
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not isinstance(prompt, list) or not isinstance(completion, list):
        bad = "prompt" if not isinstance(prompt, list) else "completion"
        raise DataFormatError(where, f"expected a string or a list of messages, got {type(data[bad]).__name__}",
                              field=bad, reason="non_string_content")
    messages = check_messages(prompt + completion, where, "prompt+completion")
    if completion and not any(m["role"] == "assistant" for m in messages[len(prompt):]):
        raise DataFormatError(where, "expected the completion to contain an assistant turn", field="completion",
                              reason="no_assistant_turn")
    return messages




def load_sft_examples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_bad_rows: str = "raise",
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    txt_split: str = "file",
) -> tuple[list[SFTExample], SkipReport]:
    """All rows of `source` (or several sources) parsed to `SFTExample`s, columns renamed by `columns` (e.g.
    {"prompt": "question", "completion": "answer"}), plain-text files as `text` rows split by `txt_split`, under the
    bad-row policy (`yulan_tune.data.records`)."""
    return load_examples(source, parse_sft_record, on_bad_rows=on_bad_rows, split=split, columns=columns,
                         txt_split=txt_split)


# ------------------------------------------------------------------------------------------------- inspecting rows


def tokenize_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with IGNORE_INDEX on untrained tokens: assistant turns only for chats, all for text."""
    if example.messages is not None:
        tokenized = tokenize_conversation(tokenizer, example.messages)
    else:
        tokenized = tokenize_text(tokenizer, example.text)
    return tokenized.input_ids, tokenized.labels


def render_trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int], open_mark: str = "«",
                         close_mark: str = "»") -> str:
    """The decoded sample with every run of trained tokens (label != IGNORE_INDEX) wrapped in «...»."""
    pieces: list[str] = []
    start = 0
    while start < len(input_ids):
        trained = labels[start] != IGNORE_INDEX
        end = start
        while end < len(input_ids) and (labels[end] != IGNORE_INDEX) == trained:
            end += 1
        text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        pieces.append(f"{open_mark}{text}{close_mark}" if trained else text)
        start = end
    return "".join(pieces)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    if not ordered:
        return {}
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]  # nearest-rank on 0..n-1
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}

