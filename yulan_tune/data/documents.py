"""Reading raw pretraining inputs as documents, in pieces that workers can take independently and resume.

The inputs are cut into pieces (byte ranges of JSONL files, Parquet row groups, whole text files, row ranges of a
`datasets` directory, shards of a hub dataset), grouped into work units of about `unit_bytes`. A unit's reader yields
(text, ends_document) segments of at most `segment_chars` characters: a longer document is cut at a pre-tokenizer
boundary (`_cut_position`) so that it is never held whole. Bad rows follow the bad-row policy (`on_bad_rows`) and
are counted in the unit's `SkipReport`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yulan_tune.data.records import (
    BLANK_LINES,
    TEXT_SUFFIXES,
    DataFormatError,
    SkipReport,
    load_hub_dataset,
    load_saved_dataset,
)

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input: a byte range of a JSONL file, a row-group range of a Parquet file, a whole
    text file, a row range of a `datasets` directory, or one shard of a streamed hub dataset."""

    kind: str  # "jsonl" | "parquet" | "text" | "arrow" | "hub"
    source: str  # file path, dataset directory, or hub name
    start: int
    end: int  # exclusive; for "hub": the number of shards, `start` being the shard index
    size: int  # estimated bytes, for grouping and progress


@dataclass
class PrepareSettings:
    seq_len: int
    text_field: str = "text"
    split: str = "train"
    unit_bytes: int = 256 * 2**20
    on_bad_rows: str = "raise"  # "raise": stop at the first bad row; "skip": count it and go on
    # longest text tokenized in one piece; longer documents are cut at pre-tokenizer boundaries (`_cut_position`).
    # Part of the settings (not derived from the worker count) so the output never depends on the number of workers.
    segment_chars: int = 2**20
    txt_split: str = "file"  # plain-text files: one document each ("file"), or documents between blank lines


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _file_pieces(path: Path, settings: PrepareSettings) -> list[Piece]:
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if suffix in JSONL_SUFFIXES:
        # byte ranges; each range owns the lines that start inside it (see _iter_jsonl_range)
        step = max(settings.unit_bytes, 1)
        return [Piece("jsonl", str(path), a, min(a + step, size), min(step, size - a)) for a in range(0, size, step)]
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        metadata = pq.ParquetFile(path).metadata
        return [
            Piece("parquet", str(path), g, g + 1, metadata.row_group(g).total_byte_size)
            for g in range(metadata.num_row_groups)
        ]
    if suffix in TEXT_SUFFIXES:
        return [Piece("text", str(path), 0, size, size)]
    raise DataFormatError(
        str(path),
        f"unsupported file type {suffix!r}: expected JSON Lines ({', '.join(JSONL_SUFFIXES)}), Parquet, or text "
        f"({', '.join(TEXT_SUFFIXES)}; one document per file, or per blank-line-separated block with txt_split)",
    )


def plan_pieces(sources: Sequence[str | os.PathLike], settings: PrepareSettings) -> tuple[list[Piece], list[str]]:
    """Every piece of every source, in a deterministic order, and the files of input directories that are not data
    (reported, not read)."""
    pieces: list[Piece] = []
    ignored: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        path = path.resolve() if path.exists() else path
        if path.is_file():
            pieces += _file_pieces(path, settings)
        elif path.is_dir() and _is_saved_dataset(path):
            dataset = load_saved_dataset(path, settings.split)
            if settings.text_field not in dataset.column_names:
                raise DataFormatError(str(path), f"no column {settings.text_field!r}: columns are {dataset.column_names}",
                                      field=settings.text_field)
            rows = len(dataset)
            bytes_per_row = max(dataset.data.nbytes // max(rows, 1), 1)
            step = max(settings.unit_bytes // bytes_per_row, 1)
            pieces += [Piece("arrow", str(path), a, min(a + step, rows), (min(a + step, rows) - a) * bytes_per_row)
                       for a in range(0, rows, step)]
        elif path.is_dir():
            suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            data_files = [p for p in files if p.suffix.lower() in suffixes]
            ignored += [str(p) for p in files if p.suffix.lower() not in suffixes]
            if not data_files:
                raise FileNotFoundError(f"{path}: no data files ({', '.join(suffixes)}) in this directory")
            for file in data_files:
                pieces += _file_pieces(file, settings)
        elif str(source).startswith((".", "/", "~")) or Path(str(source)).suffix:
            raise FileNotFoundError(f"{source}: no such file or directory")
        else:  # a hub dataset name: stream it, one piece per shard of its files
            dataset = load_hub_dataset(str(source), settings.split, streaming=True)
            shards = max(getattr(dataset, "num_shards", 1) or 1, 1)
            pieces += [Piece("hub", str(source), index, shards, 0) for index in range(shards)]
    if ignored:
        logger.warning("ignoring %d files that are not JSONL / Parquet / text: %s", len(ignored), ", ".join(ignored[:5]))
    return pieces, ignored


def group_units(pieces: Sequence[Piece], unit_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into work units of about `unit_bytes` (hub shards are units of their own)."""
    units: list[list[Piece]] = []
    current: list[Piece] = []
    current_size = 0
    for piece in pieces:
        if current and (piece.kind == "hub" or current[0].kind == "hub" or current_size + piece.size > unit_bytes):
            units.append(current)
            current, current_size = [], 0
        current.append(piece)
        current_size += piece.size
    if current:
        units.append(current)
    return units



@dataclass
class UnitStats:
    """What reading and packing one work unit counted (its skipped rows are in the unit's SkipReport)."""

    documents: int = 0
    tokens: int = 0  # including the EOS separators
    rows: int = 0
    tail_tokens: int = 0
    bytes: int = 0
    empty_documents: int = 0  # documents with no text: nothing to learn, not even an EOS
    split_documents: int = 0  # documents longer than one tokenization batch, tokenized in newline-aligned parts


def _line_number(path: str, byte_offset: int) -> int:
    """1-based line number of the line starting at `byte_offset` (only computed on the error path)."""
    count, done = 1, 0
    with open(path, "rb") as handle:
        while done < byte_offset:
            chunk = handle.read(min(2**24, byte_offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def _text_of(row: Any, where: str, text_field: str) -> str:
    if not isinstance(row, dict):
        raise DataFormatError(where, f"expected a JSON object per line, got {type(row).__name__}", reason="not_an_object")
    if text_field not in row:
        raise DataFormatError(where, f"missing; the row has {sorted(row)[:8]} (choose the column with --text-field)",
                              field=text_field, reason="missing_text")
    text = row[text_field]
    if not isinstance(text, str):
        raise DataFormatError(where, f"expected a string, got {type(text).__name__}", field=text_field,
                              reason="text_not_a_string")
    return text


def _iter_jsonl_range(piece: Piece, settings: PrepareSettings, report: SkipReport) -> Iterator[str]:
    with open(piece.source, "rb") as handle:
        if piece.start > 0:
            handle.seek(piece.start - 1)
            handle.readline()  # the line straddling `start` belongs to the previous range
        position = handle.tell()
        while position < piece.end:
            line = handle.readline()
            if not line:
                break
            line_start, position = position, position + len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield _text_of(row, "", settings.text_field)
            except (json.JSONDecodeError, UnicodeDecodeError, DataFormatError) as error:
                # the line number costs a scan of the file up to here: only for messages that are shown
                reason = error.reason if isinstance(error, DataFormatError) else "invalid_json"
                shown = report.on_bad_rows == "raise" or report.wants_example(reason)
                where = (f"{piece.source}:{_line_number(piece.source, line_start)}" if shown
                         else f"{piece.source}@byte{line_start}")
                if isinstance(error, DataFormatError):
                    report.handle(DataFormatError(where, error.message, field=error.field, reason=error.reason))
                else:
                    report.handle(DataFormatError(where, f"invalid JSON ({error}); expected one JSON object per line",
                                                  reason="invalid_json"))


def _iter_parquet_groups(piece: Piece, settings: PrepareSettings, report: SkipReport) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(piece.source)
    if settings.text_field not in parquet.schema_arrow.names:
        raise DataFormatError(piece.source, f"no column {settings.text_field!r}: columns are "
                                            f"{parquet.schema_arrow.names}", field=settings.text_field)
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))
    for batch in parquet.iter_batches(batch_size=256, row_groups=range(piece.start, piece.end),
                                      columns=[settings.text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
            else:
                report.handle(DataFormatError(f"{piece.source}[row {row}]", f"expected a string, got "
                                              f"{type(text).__name__}", field=settings.text_field,
                                              reason="text_not_a_string"))
            row += 1


def _iter_arrow_rows(piece: Piece, settings: PrepareSettings, report: SkipReport) -> Iterator[str]:
    dataset = load_saved_dataset(piece.source, settings.split).select_columns([settings.text_field])
    for start in range(piece.start, piece.end, 256):
        texts = dataset[start:min(start + 256, piece.end)][settings.text_field]
        for offset, text in enumerate(texts):
            if isinstance(text, str):
                yield text
            else:
                report.handle(DataFormatError(f"{piece.source}[row {start + offset}]", f"expected a string, got "
                                              f"{type(text).__name__}", field=settings.text_field,
                                              reason="text_not_a_string"))


def _iter_hub_shard(piece: Piece, settings: PrepareSettings, report: SkipReport) -> Iterator[str]:
    dataset = load_hub_dataset(piece.source, settings.split, streaming=True)
    if piece.end > 1:
        dataset = dataset.shard(num_shards=piece.end, index=piece.start)
    for index, row in enumerate(dataset):
        try:
            yield _text_of(row, f"{piece.source}:{settings.split} shard {piece.start} row {index}", settings.text_field)
        except DataFormatError as error:
            report.handle(error)


def _cut_position(text: str, start: int, end: int) -> int:
    """Where to cut a long document inside (start + (end-start)//2, end]: after a newline that is followed by a
    non-space character, else at a space between two non-space characters, else at `end`. The first two are
    boundaries of the Llama-3 / GPT-2 pre-tokenizer split patterns (no pre-token crosses them), so byte-level BPE
    tokenizes the parts exactly as the whole; tokenizers that split differently may differ at the cut."""
    low = start + (end - start) // 2
    for separator in ("\n", " "):
        position = end
        while True:
            found = text.rfind(separator, low, position - 1)
            if found < 0:
                break
            after, before = text[found + 1], text[found - 1] if found > 0 else "\n"
            if not after.isspace() and (separator == "\n" or not before.isspace()):
                return found + 1 if separator == "\n" else found
            position = found
    return end


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    start = 0
    while len(text) - start > max_chars:
        cut = _cut_position(text, start, start + max_chars)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _iter_text_file(piece: Piece, settings: PrepareSettings, report: SkipReport, stats: UnitStats
                    ) -> Iterator[tuple[str, bool]]:
    """A text file is one document, read in parts of at most `max_chars` so that a huge file never sits in memory."""
    if settings.txt_split == "blank_lines":
        yield from _iter_blank_line_documents(piece, settings, report, stats)
        return
    max_chars = settings.segment_chars
    parts = 0
    try:
        with open(piece.source, encoding="utf-8", newline="") as handle:
            carry = ""
            while chunk := handle.read(max_chars - len(carry)):
                text = carry + chunk
                if len(text) < max_chars:  # the end of the file is near: read on
                    carry = text
                    continue
                cut = _cut_position(text, 0, len(text))
                yield text[:cut], False
                parts += 1
                carry = text[cut:]
            if carry:
                yield carry, False
                parts += 1
    except UnicodeDecodeError as error:
        report.handle(DataFormatError(piece.source, f"not UTF-8 ({error.reason} near byte {error.start} of a "
                                      f"{max_chars}-character read); the document ends there", reason="not_utf8"))
    stats.split_documents += parts > 1
    yield "", True  # the document ends here (a file with no text counts as an empty document)


def _iter_blank_line_documents(piece: Piece, settings: PrepareSettings, report: SkipReport, stats: UnitStats
                               ) -> Iterator[tuple[str, bool]]:
    """A text file whose documents are separated by blank lines, read `segment_chars` at a time: the documents a read
    completes are yielded whole, the last one carries over; one longer than a read is yielded in parts."""
    max_chars = settings.segment_chars
    carry, continued = "", False  # continued: the carried text continues a document already partly yielded
    try:
        with open(piece.source, encoding="utf-8", newline="") as handle:
            while True:
                chunk = handle.read(max_chars)
                blocks = BLANK_LINES.split(carry + chunk)
                complete, carry = (blocks, "") if not chunk else (blocks[:-1], blocks[-1])
                for block in complete:
                    if block.strip() or continued:
                        yield block, True
                    continued = False
                if not chunk:
                    break
                if len(carry) >= max_chars:  # one document longer than a read: yield a part, keep reading it
                    cut = _cut_position(carry, 0, len(carry))
                    yield carry[:cut], False
                    stats.split_documents += not continued
                    carry, continued = carry[cut:], True
    except UnicodeDecodeError as error:
        report.handle(DataFormatError(piece.source, f"not UTF-8 ({error.reason} near byte {error.start} of a "
                                      f"{max_chars}-character read); the file ends there", reason="not_utf8"))
        if continued:
            yield "", True


def iter_segments(piece: Piece, settings: PrepareSettings, report: SkipReport,
                  stats: UnitStats) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) segments of at most `settings.segment_chars` characters: a document larger than that
    is tokenized in parts (see `_cut_position`) instead of being held whole."""
    if piece.kind == "text":
        yield from _iter_text_file(piece, settings, report, stats)
        return
    readers = {"jsonl": _iter_jsonl_range, "parquet": _iter_parquet_groups, "arrow": _iter_arrow_rows,
               "hub": _iter_hub_shard}
    for text in readers[piece.kind](piece, settings, report):
        if len(text) <= settings.segment_chars:
            yield text, True
            continue
        stats.split_documents += 1
        parts = list(_split_long(text, settings.segment_chars))
        for index, part in enumerate(parts):
            yield part, index == len(parts) - 1
