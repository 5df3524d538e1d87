"""SFT dataset formats, sources and validation.

One reader for every source a user is likely to have (JSONL, JSON, Parquet, CSV/TSV, a directory of those, a
`datasets.save_to_disk` directory, a hub dataset name) and one parser for every common chat format (OpenAI
`messages`, ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion`, plain `text`).
Every row becomes an `SFTExample` with the location it came from, so that each later error (here, or in
tokenization: too long, no trainable token) can say file, line, field and what was expected. In `skip` mode nothing
is dropped silently: every dropped row is counted by reason in a `SkipReport`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

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
# reasons that change a row but keep it (counted, but not in `total_skipped`)
KEPT_REASONS = frozenset({"too_long_truncated"})


class DataFormatError(ValueError):
    """A bad dataset row; `str()` is one actionable line: `where: field 'x': expected ..., got ...`."""

    def __init__(self, where: str, message: str, *, field: str | None = None, reason: str = "invalid") -> None:
        self.where = where
        self.field = field
        self.message = message
        self.reason = reason  # the SkipReport bucket this row lands in when skipping
        prefix = f"{where}: field '{field}': " if field else f"{where}: "
        super().__init__(prefix + message)

    @property
    def detail(self) -> str:
        return f"field '{self.field}': {self.message}" if self.field else self.message


@dataclass
class Record:
    """One raw row. `line` is the 1-based line (JSONL, CSV) or the 0-based row index (JSON list, Parquet, datasets),
    as told by `unit`."""

    source: str
    line: int | None
    data: dict
    unit: Literal["line", "row"] = "line"

    @property
    def where(self) -> str:
        return format_where(self.source, self.line, self.unit)


def format_where(source: str, line: int | None, unit: str = "line") -> str:
    if line is None:
        return source
    return f"{source}:{line}" if unit == "line" else f"{source}[{line}]"


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


@dataclass
class SkipReport:
    """Counts of rows dropped (or changed) by reason, with the first few locations of each, for the user to fix."""

    max_examples: int = 3
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}")

    def merge(self, other: SkipReport) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])

    @property
    def total_skipped(self) -> int:
        return sum(count for reason, count in self.counts.items() if reason not in KEPT_REASONS)

    def summary(self) -> str:
        if not self.counts:
            return "no rows skipped"
        lines = []
        for reason in sorted(self.counts, key=lambda r: (-self.counts[r], r)):
            verb = "changed" if reason in KEPT_REASONS else "skipped"
            lines.append(f"{reason}: {self.counts[reason]} {verb}, e.g. " + " | ".join(self.examples[reason]))
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.counts)


# ----------------------------------------------------------------------------------------------------- reading rows


def iter_records(
    source: str | os.PathLike, *, split: str = "train", errors: SkipReport | None = None
) -> Iterator[Record]:
    """Rows of a file, a directory of data files, a `datasets` saved directory, or a hub dataset name.

    Unreadable rows (invalid JSON, a row that is not an object) raise `DataFormatError`, or, when `errors` is given,
    are counted there and skipped.
    """
    path = Path(source)
    if path.is_file():
        yield from _iter_file(path, errors)
    elif path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            yield from _iter_saved_dataset(path, split)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        ignored = sorted(
            str(p.relative_to(path))
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() not in DATA_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this directory")
        if ignored:
            logger.warning("%s: ignoring %d non-data files: %s", path, len(ignored), ", ".join(ignored[:5]))
        for file in files:
            yield from _iter_file(file, errors)
    elif _looks_like_path(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
    else:
        yield from _iter_hub_dataset(str(source), split)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(DATA_SUFFIXES)


def _as_object(data: Any, where: str, errors: SkipReport | None) -> dict | None:
    if isinstance(data, dict):
        return data
    error = DataFormatError(where, f"expected a JSON object per row, got {type(data).__name__}", reason="not_an_object")
    if errors is None:
        raise error
    errors.add(error.reason, where, error.detail)
    return None


def _iter_file(path: Path, errors: SkipReport | None) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, errors)
    elif suffix == ".json":
        yield from _iter_json(path, errors)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataFormatError(str(path), f"unsupported file type {suffix!r}: expected one of {', '.join(DATA_SUFFIXES)}")


def _iter_jsonl(path: Path, errors: SkipReport | None) -> Iterator[Record]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines carry no row
            where = format_where(str(path), line_number)
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                problem = DataFormatError(
                    where, f"invalid JSON ({error.msg} at column {error.colno}); expected one JSON object per line",
                    reason="invalid_json",
                )
                if errors is None:
                    raise problem from None
                errors.add(problem.reason, where, problem.detail)
                continue
            row = _as_object(data, where, errors)
            if row is not None:
                yield Record(str(path), line_number, row)


def _iter_json(path: Path, errors: SkipReport | None) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line saved with a .json name: read it as JSONL
            yield from _iter_jsonl(path, errors)
            return
        raise DataFormatError(
            format_where(str(path), error.lineno),
            f"invalid JSON ({error.msg} at column {error.colno}); expected a list of objects or JSON lines",
            reason="invalid_json",
        ) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1 and len(data) == 1:  # {"data": [...]}: a wrapped list
            data = data[lists[0]]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataFormatError(str(path), f"expected a JSON list of objects, got {type(data).__name__}")
    for index, item in enumerate(data):
        row = _as_object(item, format_where(str(path), index, "row"), errors)
        if row is not None:
            yield Record(str(path), index, row, "row")


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(str(path), index, row, "row")
            index += 1


def _iter_csv(path: Path, delimiter: str) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        row_start = 2  # line 1 is the header
        for row in reader:
            # a quoted field may span lines: report where the row starts
            # CSV cannot tell an empty cell from a missing value; other formats' columns are empty in a mixed file
            yield Record(str(path), row_start, {k: (v if v != "" else None) for k, v in row.items() if k is not None})
            row_start = reader.line_num + 1


def _iter_saved_dataset(path: Path, split: str) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    source = str(path)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataFormatError(source, f"split {split!r} not found: expected one of {sorted(dataset)}")
        dataset = dataset[split]
        source = f"{path}:{split}"
    for index, row in enumerate(dataset):
        yield Record(source, index, dict(row), "row")


def _iter_hub_dataset(name: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for "not there / offline"; all mean the same here
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a local JSONL / JSON / "
            f"Parquet / CSV file or directory, or download it where the hub is reachable."
        ) from error
    for index, row in enumerate(dataset):
        yield Record(f"{name}:{split}", index, dict(row), "row")


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
        if not isinstance(content, str):
            raise DataFormatError(where, f"expected a string, got {type(content).__name__}",
                                  field=f"{prefix}.content", reason="non_string_content")
        normalized.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in normalized):
        raise DataFormatError(where, "expected at least one assistant turn (nothing to train on), got roles "
                              f"{[m['role'] for m in normalized]}", field=name, reason="no_assistant_turn")
    return normalized


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
    on_error: Literal["raise", "skip"] = "raise",
    split: str = "train",
) -> tuple[list[SFTExample], SkipReport]:
    """All rows of `source` (or several sources) parsed to `SFTExample`s.

    `on_error="raise"` stops at the first bad row with a `DataFormatError`; `"skip"` keeps the good rows and counts
    every bad one by reason in the returned `SkipReport` (log or print `report.summary()`).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = SkipReport()
    examples: list[SFTExample] = []
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    for one_source in sources:
        for record in iter_records(one_source, split=split, errors=report if on_error == "skip" else None):
            try:
                examples.append(parse_sft_record(record))
            except DataFormatError as error:
                if on_error == "raise":
                    raise
                report.add(error.reason, error.where, error.detail)
    if report.total_skipped:
        logger.warning("skipped %d invalid rows:\n%s", report.total_skipped, report.summary())
    return examples, report


# ------------------------------------------------------------------------------------------------- check-data CLI


def tokenize_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with -100 on untrained tokens: assistant turns only for chats, everything for text."""
    from yulan_tune.data.chat import tokenize_conversation, tokenize_text

    if example.messages is not None:
        tokenized = tokenize_conversation(tokenizer, example.messages)
    else:
        tokenized = tokenize_text(tokenizer, example.text)
    return tokenized.input_ids, tokenized.labels


def render_trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int], open_mark: str = "«",
                         close_mark: str = "»") -> str:
    """The decoded sample with every run of trained tokens (label != -100) wrapped in «...»."""
    pieces: list[str] = []
    start = 0
    while start < len(input_ids):
        trained = labels[start] != -100
        end = start
        while end < len(input_ids) and (labels[end] != -100) == trained:
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


def _config_values(config_path: str | None) -> dict[str, Any]:
    if not config_path:
        return {}
    import yaml

    with open(config_path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise DataFormatError(config_path, f"expected a YAML mapping of config fields, got {type(values).__name__}")
    return values


def check_data_main(argv: list[str] | None = None) -> int:
    """`yulan-tune check-data FILE`: validate, count, measure token lengths, show one sample with trained spans.

    Exit code 0 when every row is usable, 1 when some rows would be skipped or have nothing to train on.
    """
    parser = argparse.ArgumentParser(prog="yulan-tune check-data", description=check_data_main.__doc__)
    parser.add_argument("data", help="JSONL / JSON / Parquet / CSV file, a directory of them, or a datasets dir")
    parser.add_argument("--config", help="recipe YAML: model_name_or_path, max_length and chat_template are read")
    parser.add_argument("--model", help="model dir or hub id whose tokenizer to use (default: the tiny YuLan)")
    parser.add_argument("--max-length", type=int, help="token limit to check against (default: config max_length)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--sample", type=int, default=0, help="index of the valid sample to render")
    args = parser.parse_args(argv)

    config = _config_values(args.config)
    model = args.model or config.get("model_name_or_path")
    max_length = args.max_length or config.get("max_length")
    from yulan_tune.loading import load_tokenizer

    if model is None:
        from yulan_tune.modeling.tiny import build_tiny

        model = build_tiny()
    tokenizer = load_tokenizer(model, chat_template=config.get("chat_template"))

    examples, report = load_sft_examples(args.data, on_error="skip", split=args.split)
    formats = {name: 0 for name in SFT_FORMATS}
    for example in examples:
        formats[example.format] += 1
    print(f"{args.data}: {len(examples)} valid samples, {report.total_skipped} skipped")
    print("formats: " + ", ".join(f"{name} {count}" for name, count in formats.items() if count))
    tokenized = [tokenize_example(tokenizer, example) for example in examples]
    lengths = [len(ids) for ids, _ in tokenized]
    trained = [sum(label != -100 for label in labels) for _, labels in tokenized]
    for example, n_trained in zip(examples, trained):
        if n_trained == 0:
            report.add("no_trainable_tokens", example.where, "no token has a label (no assistant content)")
    if max_length:
        for example, length in zip(examples, lengths):
            if length > max_length:
                report.add("too_long", example.where, f"{length} tokens > max_length {max_length}")
    if lengths:
        stats = length_stats(lengths)
        print("tokens per sample: " + ", ".join(f"{k} {v:g}" for k, v in stats.items()) + f" (tokenizer: {model})")
        print(f"trained tokens: {sum(trained)} of {sum(lengths)} ({sum(trained) / max(1, sum(lengths)):.1%})")
    if report:
        print("problems:\n" + report.summary())
    else:
        print("problems: none")
    if tokenized:
        index = min(max(args.sample, 0), len(tokenized) - 1)
        ids, labels = tokenized[index]
        print(f"\nsample {index} ({examples[index].where}, {examples[index].format}); trained tokens in «»:")
        print(render_trained_spans(tokenizer, ids, labels))
    sys.stdout.flush()
    return 1 if report or not examples else 0
