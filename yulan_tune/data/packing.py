"""Pretraining data preparation: tokenize raw corpora, pack them into fixed-length rows, write memory-mapped shards
(read back by `yulan_tune.data.packed.PackedDataset`).

YuLan-Mini tokenized without special tokens and trained on fixed-length rows with labels = inputs
(docs/yulan_reference.md 5, 7.16); where EOS went between packed documents is not in the released code (5), so here
every document is followed by EOS and the rows are cut from that stream. `position_ids` restart after each EOS and at
each row start, which is what the packed-attention path uses to keep documents apart (1.3 item 6,
docs/stack_notes.md). Special-token strings inside raw text ("</s>", "<|eot_id|>") are tokenized as text, never as
control tokens: only the separators are EOS, so the document boundaries can be read back from the ids alone.

Streaming with bounded memory. The inputs are cut into work units (`yulan_tune.data.documents`). A worker process
tokenizes one unit in batches sized from the memory budget and appends full rows to its shard file as it goes, so
no worker holds more than its share of the budget whatever the corpus size. A unit's leftover tokens (less than one
row) go to a side file; all leftovers are packed into one last shard at the end, so only the final partial row of the
whole corpus is dropped (and counted). Each finished unit leaves a record; a rerun skips finished units (resume).
The manifest is written last: a directory with `manifest.json` is complete.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yulan_tune.console import progress as progress_bar
from yulan_tune.data.documents import Piece, PrepareSettings, UnitStats, group_units, iter_segments, plan_pieces
from yulan_tune.data.packed import FORMAT_NAME, FORMAT_VERSION, token_dtype
from yulan_tune.data.records import SkipReport, check_bad_row_policy, check_txt_split

logger = logging.getLogger(__name__)

# Bytes of memory per character of text in flight while tokenizing: the Python string, the `tokenizers` Encoding
# objects (ids, token strings, masks) and the id arrays. Measured at 20-24 with a byte-level BPE; 32 leaves headroom.
BYTES_PER_CHAR_IN_FLIGHT = 32


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
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)  # never trust_remote_code
        except OSError as error:  # transformers' "not found / not reachable", in many words
            raise FileNotFoundError(f"tokenizer {str(name_or_path)!r}: no such local directory, and the hub does not "
                                    f"have it or is not reachable ({type(error).__name__})") from error
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
    report = SkipReport(on_bad_rows=task.settings.on_bad_rows)
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
        for text, ends_document in iter_segments(piece, task.settings, report, stats):
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
    record = {**dataclasses.asdict(stats), "skipped": report.to_dict()}
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
    on_bad_rows: str = "raise",
    txt_split: str = "file",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize and pack `sources` into `out_dir` (see the module docstring); returns the manifest.

    `memory_budget_mb` bounds the memory for data in flight across all workers (text being tokenized, token and
    row buffers), on top of the interpreter and libraries. Rerunning on an unfinished `out_dir` resumes: finished
    units are kept. A finished `out_dir` with the same settings is returned as is.
    """
    check_bad_row_policy(on_bad_rows)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = Path(out_dir)
    settings = PrepareSettings(seq_len=seq_len, text_field=text_field, split=split, unit_bytes=int(unit_mb * 2**20),
                               on_bad_rows=on_bad_rows, segment_chars=segment_chars,
                               txt_split=check_txt_split(txt_split))
    text_tokenizer = TextTokenizer(tokenizer)
    dtype = token_dtype(text_tokenizer.vocab_size)
    pieces, ignored = plan_pieces(sources, settings)
    units = group_units(pieces, settings.unit_bytes)
    plan = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        # the tokenizer by content: the same tokenizer saved in two places prepares the same data
        "tokenizer": {"fingerprint": text_tokenizer.fingerprint, "eos_token_id": text_tokenizer.eos_token_id,
                      "vocab_size": text_tokenizer.vocab_size},
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

    total_bytes = sum(piece.size for unit in units for piece in unit)
    done_bytes = sum(record["bytes"] for record in records.values())
    with progress_bar(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="prepare-data",
                      enabled=progress) as bar:
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

    manifest = _finalize(out, plan, units, records, dtype, buffer_rows, ignored, text_tokenizer.name_or_path)
    return manifest


def _finalize(out: Path, plan: dict[str, Any], units: list[list[Piece]], records: dict[int, dict[str, Any]],
              dtype: np.dtype, buffer_rows: int, ignored: list[str], tokenizer_source: str) -> dict[str, Any]:
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
    skipped = SkipReport()
    for index in sorted(records):
        skipped.merge(SkipReport.from_dict(records[index]["skipped"]))
    rows = sum(shard["rows"] for shard in shards)
    tokens_total = sum(record["tokens"] for record in records.values())
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "eos_token_id": plan["tokenizer"]["eos_token_id"],
        "vocab_size": plan["tokenizer"]["vocab_size"],
        "tokenizer": {**plan["tokenizer"], "name_or_path": tokenizer_source},
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
        "bad_rows": dict(skipped.counts),
        "bad_row_examples": [example for shown in skipped.examples.values() for example in shown],
        "ignored_files": ignored,
        "units": len(units),
    }
    assert manifest["tokens"] + dropped == tokens_total, "packing lost tokens"  # every token is in a row or counted
    _write_json_atomic(out / "manifest.json", manifest)
    # the units' leftover files stay in work/ (under one row each): they let the tail be rebuilt if the manifest goes
    for shard in shards:
        if not shard["rows"]:
            (out / shard["file"]).unlink(missing_ok=True)
    logger.debug("%s: %d rows of %d tokens from %d documents; dropped %d tokens of the final partial row%s", out,
                 rows, seq_len, manifest["documents"], dropped,
                 f"; skipped {skipped.total_skipped} bad rows {skipped.counts}" if skipped else "")
    return manifest
