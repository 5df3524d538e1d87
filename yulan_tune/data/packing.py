"""Pretraining data: tokenize raw corpora, pack them into fixed-length rows, write memory-mapped shards, read them back.

YuLan-Mini tokenized without special tokens and trained on fixed-length rows with labels = inputs
(yulan_reference.md 5, 7.16); where EOS went between packed documents is not in the released code (5), so here every
document is followed by EOS and the rows are cut from that stream. `position_ids` restart after each EOS and at each
row start, which is what the packed-attention path uses to keep documents apart (1.3 item 6, stack_notes.md).
Special-token strings inside raw text ("</s>", "<|eot_id|>") are tokenized as text, never as control tokens: only the
separators are EOS, so the document boundaries can be read back from the ids alone.

Streaming with bounded memory. The inputs are cut into work units (byte ranges of JSONL files, Parquet row groups,
row ranges of a `datasets` directory, groups of small text files, shards of a hub dataset). A worker process
tokenizes one unit in batches sized from the memory budget and appends full rows to its shard file as it goes, so
no worker holds more than its share of the budget whatever the corpus size. A unit's leftover tokens (less than one
row) go to a side file; all leftovers are packed into one last shard at the end, so only the final partial row of the
whole corpus is dropped (and counted). Each finished unit leaves a record; a rerun skips finished units (resume).
The manifest is written last: a directory with `manifest.json` is complete.

Output layout:
    manifest.json          settings, shards (file, rows), totals, every skipped row / file counted
    shards/unit-00000.bin  rows x seq_len token ids, uint16 when the vocabulary fits, else uint32
    shards/tail.bin        the rows packed from all units' leftovers
    work/                  plan + per-unit records (resume bookkeeping)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yulan_tune.data.formats import DataFormatError

logger = logging.getLogger(__name__)

FORMAT_NAME = "yulan_tune.packed"
FORMAT_VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".text")
# Bytes of memory per character of text in flight while tokenizing: the Python string, the `tokenizers` Encoding
# objects (ids, token strings, masks) and the id arrays. Measured at 20-24 with a byte-level BPE; 32 leaves headroom.
BYTES_PER_CHAR_IN_FLIGHT = 32
MAX_BAD_ROW_EXAMPLES = 5


# ------------------------------------------------------------------------------------------------ work planning


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
    on_bad_row: str = "error"  # "error": stop at the first bad row; "skip": count it and go on
    # longest text tokenized in one piece; longer documents are cut at pre-tokenizer boundaries (`_cut_position`).
    # Part of the settings (not derived from the worker count) so the output never depends on the number of workers.
    segment_chars: int = 2**20


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _load_saved_dataset(path: str, split: str):
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(path)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataFormatError(path, f"split {split!r} not found: expected one of {sorted(dataset)}")
        dataset = dataset[split]
    return dataset


def _load_hub_dataset(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:  # datasets raises many types for "not there / offline"; all mean the same here
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and streaming it as a hub dataset failed "
            f"({type(error).__name__}: {first_line}). Pass local JSONL / Parquet / text files, a directory of them or "
            f"a `datasets` directory, or download the dataset where the hub is reachable."
        ) from error


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
        f"({', '.join(TEXT_SUFFIXES)}; one document per file)",
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
            dataset = _load_saved_dataset(str(path), settings.split)
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
            dataset = _load_hub_dataset(str(source), settings.split)
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


# ------------------------------------------------------------------------------------------------ tokenizer


class TextTokenizer:
    """Raw text -> token ids with no special tokens added, special-token strings read as plain text.

    Wraps the `tokenizers` backend of a transformers tokenizer directory (or hub id) so that worker processes
    encode without the transformers call overhead.
    """

    def __init__(self, name_or_path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        local = Path(name_or_path).expanduser()
        self.name_or_path = str(local.resolve()) if local.exists() else str(name_or_path)
        hf_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)  # never trust_remote_code
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {self.name_or_path}: has no EOS token; packing needs one between documents")
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {self.name_or_path}: no fast (`tokenizers`) backend; save it with a "
                             f"tokenizer.json (AutoTokenizer.from_pretrained(..).save_pretrained(dir) converts it)")
        serialized = backend.to_str()
        self.backend = Tokenizer.from_str(serialized)  # a copy: the caller's tokenizer is not changed
        self.backend.encode_special_tokens = True  # "</s>" in raw text stays text; only separators are EOS
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        self.vocab_size = len(hf_tokenizer)
        self.fingerprint = hashlib.sha256(serialized.encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-based worker pools
        state = dict(self.__dict__)
        state["backend"] = self.backend.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(state.pop("backend"))
        backend.encode_special_tokens = True
        self.__dict__.update(state, backend=backend)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------------ reading documents


@dataclass
class UnitStats:
    documents: int = 0
    tokens: int = 0  # including the EOS separators
    rows: int = 0
    tail_tokens: int = 0
    bytes: int = 0
    empty_documents: int = 0  # documents with no text: nothing to learn, not even an EOS
    split_documents: int = 0  # documents longer than one tokenization batch, tokenized in newline-aligned parts
    bad_rows: dict[str, int] = field(default_factory=dict)  # reason -> count (only with on_bad_row="skip")
    bad_row_examples: list[str] = field(default_factory=list)


class _BadRows:
    def __init__(self, settings: PrepareSettings, stats: UnitStats) -> None:
        self.skip = settings.on_bad_row == "skip"
        self.stats = stats

    @property
    def wants_detail(self) -> bool:
        """Whether the next bad row's message will be shown (raised, or kept as an example)."""
        return not self.skip or len(self.stats.bad_row_examples) < MAX_BAD_ROW_EXAMPLES

    def report(self, error: DataFormatError) -> None:
        if not self.skip:
            raise error
        self.stats.bad_rows[error.reason] = self.stats.bad_rows.get(error.reason, 0) + 1
        if len(self.stats.bad_row_examples) < MAX_BAD_ROW_EXAMPLES:
            self.stats.bad_row_examples.append(str(error))


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


def _iter_jsonl_range(piece: Piece, settings: PrepareSettings, bad: _BadRows) -> Iterator[str]:
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
                where = (f"{piece.source}:{_line_number(piece.source, line_start)}" if bad.wants_detail
                         else f"{piece.source}@byte{line_start}")
                if isinstance(error, DataFormatError):
                    bad.report(DataFormatError(where, error.message, field=error.field, reason=error.reason))
                else:
                    bad.report(DataFormatError(where, f"invalid JSON ({error}); expected one JSON object per line",
                                               reason="invalid_json"))


def _iter_parquet_groups(piece: Piece, settings: PrepareSettings, bad: _BadRows) -> Iterator[str]:
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
                bad.report(DataFormatError(f"{piece.source}[row {row}]", f"expected a string, got "
                                           f"{type(text).__name__}", field=settings.text_field,
                                           reason="text_not_a_string"))
            row += 1


def _iter_arrow_rows(piece: Piece, settings: PrepareSettings, bad: _BadRows) -> Iterator[str]:
    dataset = _load_saved_dataset(piece.source, settings.split).select_columns([settings.text_field])
    for start in range(piece.start, piece.end, 256):
        texts = dataset[start:min(start + 256, piece.end)][settings.text_field]
        for offset, text in enumerate(texts):
            if isinstance(text, str):
                yield text
            else:
                bad.report(DataFormatError(f"{piece.source}[row {start + offset}]", f"expected a string, got "
                                           f"{type(text).__name__}", field=settings.text_field,
                                           reason="text_not_a_string"))


def _iter_hub_shard(piece: Piece, settings: PrepareSettings, bad: _BadRows) -> Iterator[str]:
    dataset = _load_hub_dataset(piece.source, settings.split)
    if piece.end > 1:
        dataset = dataset.shard(num_shards=piece.end, index=piece.start)
    for index, row in enumerate(dataset):
        try:
            yield _text_of(row, f"{piece.source}:{settings.split} shard {piece.start} row {index}", settings.text_field)
        except DataFormatError as error:
            bad.report(error)


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


def _iter_text_file(piece: Piece, max_chars: int, bad: _BadRows, stats: UnitStats) -> Iterator[tuple[str, bool]]:
    """A text file is one document, read in parts of at most `max_chars` so that a huge file never sits in memory."""
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
        bad.report(DataFormatError(piece.source, f"not UTF-8 ({error.reason} near byte {error.start} of a "
                                   f"{max_chars}-character read); the document ends there", reason="not_utf8"))
    stats.split_documents += parts > 1
    yield "", True  # the document ends here (a file with no text counts as an empty document)


def _iter_segments(piece: Piece, settings: PrepareSettings, bad: _BadRows,
                   stats: UnitStats) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) segments of at most `settings.segment_chars` characters: a document larger than that
    is tokenized in parts (see `_cut_position`) instead of being held whole."""
    if piece.kind == "text":
        yield from _iter_text_file(piece, settings.segment_chars, bad, stats)
        return
    readers = {"jsonl": _iter_jsonl_range, "parquet": _iter_parquet_groups, "arrow": _iter_arrow_rows,
               "hub": _iter_hub_shard}
    for text in readers[piece.kind](piece, settings, bad):
        if len(text) <= settings.segment_chars:
            yield text, True
            continue
        stats.split_documents += 1
        parts = list(_split_long(text, settings.segment_chars))
        for index, part in enumerate(parts):
            yield part, index == len(parts) - 1


# ------------------------------------------------------------------------------------------------ packing one unit


class _RowWriter:
    """Appends tokens; writes every complete row to `path` through a bounded buffer; keeps the partial last row."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, buffer_rows: int) -> None:
        self.handle = open(path, "wb")
        self.seq_len = seq_len
        self.buffer = np.empty(max(buffer_rows, 1) * seq_len, dtype=dtype)
        self.fill = 0
        self.rows = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self._flush_rows()

    def _flush_rows(self) -> None:
        full = self.fill // self.seq_len * self.seq_len
        self.buffer[:full].tofile(self.handle)
        self.rows += full // self.seq_len
        leftover = self.fill - full
        self.buffer[:leftover] = self.buffer[full:self.fill]
        self.fill = leftover

    def close(self) -> np.ndarray:
        self._flush_rows()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return self.buffer[:self.fill].copy()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class _UnitTask:
    index: int
    pieces: list[Piece]
    out_dir: str
    settings: PrepareSettings
    dtype: str
    batch_chars: int
    buffer_rows: int


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer, parallel_tokenizer: bool) -> None:
    global _WORKER_TOKENIZER
    if not parallel_tokenizer:  # several worker processes: one thread each, not a thread pool per process
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer


def unit_name(index: int) -> str:
    return f"unit-{index:05d}"


def _pack_unit(task: _UnitTask) -> tuple[int, dict[str, Any]]:
    tokenizer = _WORKER_TOKENIZER
    assert tokenizer is not None, "worker not initialized"
    out = Path(task.out_dir)
    name = unit_name(task.index)
    stats = UnitStats(bytes=sum(piece.size for piece in task.pieces))
    bad = _BadRows(task.settings, stats)
    dtype = np.dtype(task.dtype)
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    shard_tmp = out / "shards" / f"{name}.bin.tmp"
    writer = _RowWriter(shard_tmp, task.settings.seq_len, dtype, task.buffer_rows)

    batch: list[str] = []
    ends: list[bool] = []  # whether each segment in the batch ends its document (then an EOS follows it)
    batch_chars = 0
    document_has_text = False

    def flush() -> None:
        nonlocal batch_chars
        if not batch:
            return
        parts: list[np.ndarray] = []
        for ids, ends_document in zip(tokenizer.encode_batch(batch), ends):
            parts.append(np.asarray(ids, dtype=dtype))
            if ends_document:
                parts.append(eos)
        tokens = np.concatenate(parts)
        stats.tokens += len(tokens)
        writer.add(tokens)
        batch.clear()
        ends.clear()
        batch_chars = 0

    for piece in task.pieces:
        for text, ends_document in _iter_segments(piece, task.settings, bad, stats):
            if text:
                batch.append(text)
                ends.append(ends_document)
                batch_chars += len(text)
                document_has_text = True
            elif ends_document and document_has_text:  # the EOS of a document whose text came in earlier segments
                batch.append("")
                ends.append(True)
            if ends_document:
                stats.documents += document_has_text
                stats.empty_documents += not document_has_text
                document_has_text = False
            if batch_chars >= task.batch_chars:
                flush()
    flush()
    tail = writer.close()
    stats.rows = writer.rows
    stats.tail_tokens = len(tail)
    tail_tmp = out / "work" / f"{name}.tail.bin.tmp"
    tail.tofile(tail_tmp)
    os.replace(tail_tmp, out / "work" / f"{name}.tail.bin")
    os.replace(shard_tmp, out / "shards" / f"{name}.bin")
    record = dataclasses.asdict(stats)
    _write_json_atomic(out / "work" / f"{name}.json", record)  # written last: the unit is done
    return task.index, record


# ------------------------------------------------------------------------------------------------ the whole run


def _memory_plan(memory_budget_bytes: int, workers: int, seq_len: int, itemsize: int) -> tuple[int, int]:
    """(characters per tokenization batch, rows per write buffer) for each worker, from its share of the budget:
    three quarters for text in flight, one quarter for the row buffer."""
    share = memory_budget_bytes // max(workers, 1)
    batch_chars = max(share * 3 // 4 // BYTES_PER_CHAR_IN_FLIGHT, 4096)
    buffer_rows = max(share // 4 // (seq_len * itemsize), 1)
    return batch_chars, buffer_rows


def prepare_packed_dataset(
    sources: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seq_len: int = 4096,
    text_field: str = "text",
    split: str = "train",
    num_workers: int = 1,
    memory_budget_mb: float = 1024,
    unit_mb: float = 256,
    segment_chars: int = 2**20,
    on_bad_row: str = "error",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize and pack `sources` into `out_dir` (see the module docstring); returns the manifest.

    `memory_budget_mb` bounds the memory for data in flight across all workers (text being tokenized, token and
    row buffers), on top of the interpreter and libraries. Rerunning on an unfinished `out_dir` resumes: finished
    units are kept. A finished `out_dir` with the same settings is returned as is.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = Path(out_dir)
    settings = PrepareSettings(seq_len=seq_len, text_field=text_field, split=split, unit_bytes=int(unit_mb * 2**20),
                               on_bad_row=on_bad_row, segment_chars=segment_chars)
    text_tokenizer = TextTokenizer(tokenizer)
    dtype = token_dtype(text_tokenizer.vocab_size)
    pieces, ignored = plan_pieces(sources, settings)
    units = group_units(pieces, settings.unit_bytes)
    plan = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "tokenizer": {"name_or_path": text_tokenizer.name_or_path, "fingerprint": text_tokenizer.fingerprint,
                      "eos_token_id": text_tokenizer.eos_token_id, "vocab_size": text_tokenizer.vocab_size},
        "units": [[dataclasses.asdict(piece) for piece in unit] for unit in units],
    }
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    plan_path = out / "work" / "plan.json"
    manifest_path = out / "manifest.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != json.loads(json.dumps(plan)):
            changed = sorted(key for key in plan if previous.get(key) != json.loads(json.dumps(plan[key])))
            raise ValueError(f"{out}: holds a preparation with different {', '.join(changed)} (inputs, tokenizer or "
                             f"settings changed); use another output directory or delete this one")
        if manifest_path.exists():
            logger.info("%s: already prepared", out)
            return json.loads(manifest_path.read_text())
    else:
        _write_json_atomic(plan_path, plan)

    records: dict[int, dict[str, Any]] = {}
    for index in range(len(units)):
        record_path = out / "work" / f"{unit_name(index)}.json"
        if record_path.exists():
            records[index] = json.loads(record_path.read_text())
    todo = [index for index in range(len(units)) if index not in records]
    workers = max(1, min(num_workers, len(todo)))
    batch_chars, buffer_rows = _memory_plan(int(memory_budget_mb * 2**20), workers, seq_len, dtype.itemsize)
    if segment_chars > batch_chars:
        raise ValueError(
            f"memory budget {memory_budget_mb} MB over {workers} workers allows {batch_chars} characters in flight per "
            f"worker, less than segment_chars={segment_chars}: raise the budget, use fewer workers, or lower "
            f"segment_chars"
        )
    tasks = [_UnitTask(i, units[i], str(out), settings, dtype.str, batch_chars, buffer_rows) for i in todo]
    if records:
        logger.info("%s: resuming, %d of %d units already done", out, len(records), len(units))

    from tqdm.auto import tqdm

    total_bytes = sum(piece.size for unit in units for piece in unit)
    done_bytes = sum(record["bytes"] for record in records.values())
    with tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="prepare-data",
              disable=not progress) as bar:
        if workers == 1:
            _init_worker(text_tokenizer, parallel_tokenizer=True)
            results = map(_pack_unit, tasks)
            for index, record in results:
                records[index] = record
                bar.update(record["bytes"])
                bar.set_postfix(tokens=sum(r["tokens"] for r in records.values()))
        else:
            # fork shares the already-imported libraries with the workers; where fork is unavailable, spawn
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            # Python's cyclic GC writes to every tracked object it visits; in a forked worker that copies each page
            # of the parent's objects (hundreds of MB with torch imported). Frozen objects are never visited.
            gc.freeze()
            with context.Pool(workers, initializer=_init_worker, initargs=(text_tokenizer, False)) as pool:
                for index, record in pool.imap_unordered(_pack_unit, tasks):
                    records[index] = record
                    bar.update(record["bytes"])
                    bar.set_postfix(tokens=sum(r["tokens"] for r in records.values()))

    manifest = _finalize(out, plan, units, records, dtype, buffer_rows, ignored)
    return manifest


def _finalize(out: Path, plan: dict[str, Any], units: list[list[Piece]], records: dict[int, dict[str, Any]],
              dtype: np.dtype, buffer_rows: int, ignored: list[str]) -> dict[str, Any]:
    """Pack the units' leftovers (in unit order) into the tail shard and write the manifest last."""
    seq_len = plan["settings"]["seq_len"]
    tail_tmp = out / "shards" / "tail.bin.tmp"
    writer = _RowWriter(tail_tmp, seq_len, dtype, buffer_rows)
    for index in range(len(units)):
        writer.add(np.fromfile(out / "work" / f"{unit_name(index)}.tail.bin", dtype=dtype))
    dropped = len(writer.close())
    os.replace(tail_tmp, out / "shards" / "tail.bin")

    shards = [{"file": f"shards/{unit_name(i)}.bin", "rows": records[i]["rows"]} for i in range(len(units))]
    shards.append({"file": "shards/tail.bin", "rows": writer.rows})
    bad_rows: Counter[str] = Counter()
    for record in records.values():
        bad_rows.update(record["bad_rows"])
    rows = sum(shard["rows"] for shard in shards)
    tokens_total = sum(record["tokens"] for record in records.values())
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "eos_token_id": plan["tokenizer"]["eos_token_id"],
        "vocab_size": plan["tokenizer"]["vocab_size"],
        "tokenizer": plan["tokenizer"],
        "settings": plan["settings"],
        "shards": [shard for shard in shards if shard["rows"]],
        "rows": rows,
        "tokens": rows * seq_len,
        "documents": sum(record["documents"] for record in records.values()),
        "tokenized_tokens": tokens_total,
        # nothing is dropped silently: what did not make it into a row, and why
        "dropped_final_partial_row_tokens": dropped,
        "empty_documents": sum(record["empty_documents"] for record in records.values()),
        "split_documents": sum(record["split_documents"] for record in records.values()),
        "bad_rows": dict(bad_rows),
        "bad_row_examples": [e for i in sorted(records) for e in records[i]["bad_row_examples"]][:MAX_BAD_ROW_EXAMPLES],
        "ignored_files": ignored,
        "units": len(units),
    }
    assert manifest["tokens"] + dropped == tokens_total, "packing lost tokens"  # every token is in a row or counted
    _write_json_atomic(out / "manifest.json", manifest)
    # the units' leftover files stay in work/ (under one row each): they let the tail be rebuilt if the manifest goes
    for shard in shards:
        if not shard["rows"]:
            (out / shard["file"]).unlink(missing_ok=True)
    skipped = sum(bad_rows.values())
    logger.info("%s: %d rows of %d tokens from %d documents; dropped %d tokens of the final partial row%s", out,
                rows, seq_len, manifest["documents"], dropped, f"; skipped {skipped} bad rows {dict(bad_rows)}"
                if skipped else "")
    return manifest


# ------------------------------------------------------------------------------------------------ reading rows back


def packed_position_ids(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Positions restarting at 0 at the row start and after every EOS (the first token of the next document)."""
    ids = np.asarray(input_ids)
    index = np.arange(ids.shape[-1])
    starts = np.zeros(ids.shape, dtype=bool)
    starts[..., 0] = True
    starts[..., 1:] = ids[..., :-1] == eos_token_id
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return index - last_start


class PackedDataset:
    """Map-style dataset over a prepared directory: row `i` -> `input_ids`, `labels` (= inputs; the model shifts)
    and `position_ids`, each a LongTensor of `seq_len`. Shards are memory-mapped (a few at a time, least recently
    used first out) so random access costs no more memory than the pages read."""

    MAX_OPEN_SHARDS = 64

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = (" (an unfinished preparation: rerun prepare-data to resume it)"
                    if (self.path / "work" / "plan.json").exists() else "")
            raise FileNotFoundError(f"{self.path}: no manifest.json, not a prepared dataset{hint}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')} v{self.manifest.get('version')},"
                             f" expected {FORMAT_NAME} v{FORMAT_VERSION}")
        self.seq_len: int = self.manifest["seq_len"]
        self.eos_token_id: int = self.manifest["eos_token_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._files = [self.path / shard["file"] for shard in self.manifest["shards"]]
        self._rows = np.array([shard["rows"] for shard in self.manifest["shards"]], dtype=np.int64)
        self._ends = np.cumsum(self._rows)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def _shard(self, index: int) -> np.memmap:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        rows = int(self._rows[index])
        shard = np.memmap(self._files[index], dtype=self.dtype, mode="r", shape=(rows, self.seq_len))
        self._open[index] = shard
        if len(self._open) > self.MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def row(self, index: int) -> np.ndarray:
        """Token ids of row `index` (a copy, as int64)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {self.path} ({len(self)} rows)")
        index %= len(self)
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        return np.asarray(self._shard(shard)[local], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        ids = self.row(int(index))
        input_ids = torch.from_numpy(ids)
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "position_ids": torch.from_numpy(packed_position_ids(ids, self.eos_token_id)),
        }

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own memory maps
        return {**self.__dict__, "_open": OrderedDict()}


# ------------------------------------------------------------------------------------------------ command line


def prepare_data_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="yulan-tune prepare-data",
        description="Tokenize raw corpora (no special tokens, EOS between documents), pack them into fixed-length "
                    "rows and write memory-mapped shards for pretraining. Rerun the same command to resume.",
    )
    parser.add_argument("sources", nargs="+", help="JSONL / Parquet / .txt files, directories of them, `datasets` "
                                                   "directories (save_to_disk), or hub dataset names")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed row (default 4096)")
    parser.add_argument("--text-field", default="text", help="JSONL / Parquet / datasets column with the text")
    parser.add_argument("--split", default="train", help="split of a `datasets` directory or hub dataset")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="worker processes")
    parser.add_argument("--memory-budget-mb", type=float, default=1024,
                        help="memory for data in flight across all workers, on top of the libraries (default 1024)")
    parser.add_argument("--unit-mb", type=float, default=256, help="input MB per work unit (resume granularity)")
    parser.add_argument("--segment-chars", type=int, default=2**20,
                        help="longest text tokenized in one piece; longer documents are cut at token boundaries")
    parser.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                        help="stop at the first bad row (default), or count and skip bad rows")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = prepare_packed_dataset(
            args.sources, args.tokenizer, args.out, seq_len=args.seq_len, text_field=args.text_field,
            split=args.split, num_workers=args.workers, memory_budget_mb=args.memory_budget_mb, unit_mb=args.unit_mb,
            segment_chars=args.segment_chars, on_bad_row=args.on_bad_row, progress=not args.no_progress,
        )
    except (DataFormatError, FileNotFoundError, ValueError) as error:
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: manifest[key] for key in ("rows", "seq_len", "tokens", "documents",
                                                     "dropped_final_partial_row_tokens", "bad_rows")}))
    return 0
