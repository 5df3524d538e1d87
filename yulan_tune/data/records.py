"""Reading rows from every source a user is likely to have, and counting the rows that cannot be used.

One reader (`iter_records`) for JSONL, JSON, Parquet, CSV/TSV, a directory of those, a `datasets.save_to_disk`
directory and a hub dataset name; every row becomes a `Record` with the location it came from, so that each later
error can say file, line, field and what was expected (`DataFormatError`). One policy for bad rows everywhere
(`on_bad_rows`): "raise" stops at the first one, "skip" keeps going and counts every skipped row by reason in a
`SkipReport`; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", *TEXT_SUFFIXES)
# how a plain-text file holds documents: the whole file is one, or documents are separated by blank lines
TXT_SPLITS = ("file", "blank_lines")
BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# reasons that change a row but keep it (counted, but not in `total_skipped`)
KEPT_REASONS = frozenset({"too_long_truncated", "rejected_cut_at_first_difference"})
BAD_ROW_POLICIES = ("raise", "skip")
BadRowPolicy = Literal["raise", "skip"]
Example = TypeVar("Example")


def check_txt_split(value: str) -> str:
    if value not in TXT_SPLITS:
        raise ValueError(f"txt_split must be 'file' (one document per text file) or 'blank_lines' (documents "
                         f"separated by blank lines), got {value!r}")
    return value


def check_bad_row_policy(value: str, name: str = "on_bad_rows") -> str:
    if value not in BAD_ROW_POLICIES:
        raise ValueError(f"{name} must be 'raise' (stop at the first bad row) or 'skip' (count it and go on), "
                         f"got {value!r}")
    return value


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
class SkipReport:
    """Counts of rows dropped (or changed) by reason, with the first few locations of each, for the user to fix, and
    the bad-row policy that decides whether a bad row is counted here or raised (`handle`)."""

    on_bad_rows: str = "raise"
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

    def wants_example(self, reason: str) -> bool:
        """Whether a row skipped for `reason` would still be shown as an example (worth a costly location)."""
        return len(self.examples.get(reason, [])) < self.max_examples

    def handle(self, error: DataFormatError) -> None:
        """Apply the bad-row policy to `error`: raise it, or count it here."""
        if self.on_bad_rows == "raise":
            raise error
        self.add(error.reason, error.where, error.detail)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipReport:
        return cls(counts=dict(data["counts"]), examples={k: list(v) for k, v in data["examples"].items()})



# ----------------------------------------------------------------------------------------------------- reading rows


def iter_records(
    source: str | os.PathLike, *, split: str = "train", errors: SkipReport | None = None, txt_split: str = "file"
) -> Iterator[Record]:
    """Rows of a file, a directory of data files, a `datasets` saved directory, or a hub dataset name. A plain-text
    file (TEXT_SUFFIXES) gives `{"text": ...}` rows: the whole file, or each blank-line-separated block
    (`txt_split`).

    Unreadable rows (invalid JSON, a row that is not an object) raise `DataFormatError`, or, when `errors` is given,
    are counted there and skipped.
    """
    check_txt_split(txt_split)
    path = Path(source)
    if path.is_file():
        yield from _iter_file(path, errors, txt_split)
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
            yield from _iter_file(file, errors, txt_split)
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


def _iter_file(path: Path, errors: SkipReport | None, txt_split: str = "file") -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _iter_text(path, txt_split)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, errors)
    elif suffix == ".json":
        yield from _iter_json(path, errors)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataFormatError(str(path), f"unsupported file type {suffix!r}: expected one of {', '.join(DATA_SUFFIXES)}")


def not_utf8(where: str, error: UnicodeDecodeError) -> DataFormatError:
    return DataFormatError(where, f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at byte {error.start} "
                           f"cannot be decoded); save the file as UTF-8", reason="not_utf8")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(str(path), error) from None


def _iter_jsonl(path: Path, errors: SkipReport | None) -> Iterator[Record]:
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is reported with its number
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines carry no row
            where = format_where(str(path), line_number)
            try:
                data = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                problem = not_utf8(where, error) if isinstance(error, UnicodeDecodeError) else DataFormatError(
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


def _iter_text(path: Path, txt_split: str) -> Iterator[Record]:
    """A plain-text file as text rows; a block's line is the line it starts on."""
    text = _read_text(path)
    if txt_split == "file":
        if text.strip():
            yield Record(str(path), 1, {"text": text})
        return
    start = 0
    for separator in [*BLANK_LINES.finditer(text), None]:
        end = separator.start() if separator else len(text)
        block = text[start:end]
        if block.strip():
            yield Record(str(path), text.count("\n", 0, start) + 1, {"text": block})
        if separator:
            start = separator.end()


def _iter_json(path: Path, errors: SkipReport | None) -> Iterator[Record]:
    text = _read_text(path)
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
    text = _read_text(path)  # decoded whole: a CSV row can span lines, and a bad byte is reported with its offset
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        row_start = 2  # line 1 is the header
        for row in reader:
            # a quoted field may span lines: report where the row starts
            # CSV cannot tell an empty cell from a missing value; other formats' columns are empty in a mixed file
            yield Record(str(path), row_start, {k: (v if v != "" else None) for k, v in row.items() if k is not None})
            row_start = reader.line_num + 1


def load_saved_dataset(path: str | os.PathLike, split: str) -> Any:
    """A `datasets.save_to_disk` directory; of a DatasetDict, the `split`."""
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataFormatError(str(path), f"split {split!r} not found: expected one of {sorted(dataset)}")
        dataset = dataset[split]
    return dataset


def load_hub_dataset(name: str, split: str, *, streaming: bool = False) -> Any:
    """A hub dataset's split; one actionable line when it is not there or the hub is not reachable."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as error:  # datasets raises many types for "not there / offline"; all mean the same here
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and {'streaming' if streaming else 'loading'} it as a hub "
            f"dataset failed "
            f"({type(error).__name__}: {first_line}). Pass a local JSONL / JSON / Parquet / CSV file or directory, "
            f"or download the dataset where the hub is reachable."
        ) from error


def _iter_saved_dataset(path: Path, split: str) -> Iterator[Record]:
    dataset = load_saved_dataset(path, split)
    source = str(path) if not (path / "dataset_dict.json").exists() else f"{path}:{split}"
    for index, row in enumerate(dataset):
        yield Record(source, index, dict(row), "row")


def _iter_hub_dataset(name: str, split: str) -> Iterator[Record]:
    for index, row in enumerate(load_hub_dataset(name, split)):
        yield Record(f"{name}:{split}", index, dict(row), "row")


def parse_mapping_text(value: Any, name: str, expected: str) -> Any:
    """A mapping as the command line gives it: a JSON object, or "key=value,key=value" (values stay strings; a key
    may itself contain "=", the last one separates). Anything but a string is returned as it is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}={value!r}: invalid JSON ({error.msg} at column {error.colno})") from None
    pairs = [item.rsplit("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise ValueError(f"{name}={value!r}: expected {expected} or a JSON object")
    return {key.strip(): item.strip() for key, item in pairs}


def parse_columns(value: Mapping[str, str] | str | None) -> dict[str, str]:
    """A column mapping {our field: the dataset's column} (as LLaMA-Factory's dataset `columns`): a mapping, a JSON
    object, or "prompt=question,completion=answer"."""
    if value is None or value == "" or value == {}:
        return {}
    value = parse_mapping_text(value, "columns", "'our_field=their_column,...'")
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"columns: expected a mapping of field names to column names, got {value!r}")
    return dict(value)


def rename_columns(record: Record, columns: Mapping[str, str]) -> Record:
    """The record with the dataset's columns under our field names (absent columns are left absent)."""
    if not columns:
        return record
    data = dict(record.data)
    for ours, theirs in columns.items():
        if theirs in data:
            data[ours] = data.pop(theirs)
    return Record(record.source, record.line, data, record.unit)


def load_examples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    parse: Callable[[Record], Example],
    *,
    on_bad_rows: str = "raise",
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    txt_split: str = "file",
) -> tuple[list[Example], SkipReport]:
    """Every row of `source` (or several sources) through `parse`, its columns renamed by `columns` first, under the
    bad-row policy: "raise" stops at the first bad row with its `DataFormatError`; "skip" keeps the good rows and
    counts each bad one in the report."""
    report = SkipReport(on_bad_rows=check_bad_row_policy(on_bad_rows))
    examples: list[Example] = []
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    for one_source in sources:
        for record in iter_records(one_source, split=split, errors=report if on_bad_rows == "skip" else None,
                                   txt_split=txt_split):
            try:
                examples.append(parse(rename_columns(record, columns or {})))
            except DataFormatError as error:
                report.handle(error)
    if report.total_skipped:
        logger.warning("skipped %d invalid rows:\n%s", report.total_skipped, report.summary())
    return examples, report
