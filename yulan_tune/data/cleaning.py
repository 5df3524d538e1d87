"""Cleaning raw pretraining text with datatrove: read, normalize, filter, decontaminate, deduplicate, score.

Every stage is one of datatrove's blocks run by its `LocalPipelineExecutor` (the same pipeline runs on Slurm or Ray
with datatrove's other executors); ours only subclass them through their hooks:

    read            JsonlReader / ParquetReader (+ a text-file reader): counts rows without text and bad rows
    unicode         FTFYFormatter (mojibake, control characters, `normalization` NFC/NFKC on request)
    gopher_quality, gopher_repetition, c4_quality, fineweb_quality      datatrove's heuristic filters
    decontamination NGramsDecontFilter against an index of evaluation sets (13-grams by default)
    exact_dedup     ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter (64-bit xxhash of the normalized text)
    minhash_dedup   MinhashDedupSignature -> Buckets -> Cluster -> Filter (word 5-grams, 14 bands x 8 rows)
    quality_score   any scorer (a fastText model file or a Hugging Face sequence-classification directory)

Kept documents go to `<out>/kept/` (with a scorer: `<out>/kept/<name>_scored_dedup/score_<k>/`, the layout of
YuLan's data-mix files); every removed one to `<out>/removed/<stage>/` with its `filter_reason`. Intermediate shards,
datatrove's logs and per-task completion markers live in `<out>/work/`: a killed run resumes where it stopped.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter, NGramsDecontIndexer
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer, strip_strings

from yulan_tune.data.documents import JSONL_SUFFIXES, PARQUET_SUFFIXES
from yulan_tune.data.records import (
    BAD_ROW_POLICIES,
    BLANK_LINES,
    TEXT_SUFFIXES,
    TXT_SPLITS,
    check_bad_row_policy,
    check_txt_split,
)

# the held-out math problems: `generate_problems(200, seed=0, split="test")`, the set `prepare_bundled_corpus` packs
# as "math-test" and the lm-eval task yulan_math scores (never trained on)
HELDOUT_MATH = "math-test"
HELDOUT_MATH_PROBLEMS, HELDOUT_MATH_SEED = 200, 0
LM_EVAL_PREFIX = "lm-eval:"
HEURISTIC_FILTERS = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
                     "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}
SHARD = "${rank}.jsonl"
# the `filter_reason` of a removed document where datatrove's block gives none (the dedup blocks)
REMOVAL_REASONS = {"exact_dedup": "exact duplicate of a kept document",
                   "minhash_dedup": "near duplicate of a kept document (MinHash)"}
RUN_FILE = "run.json"


def _default_minhash() -> dict:
    # datatrove's defaults, stated: word 5-grams, b = 14 bands of r = 8 rows; a pair of Jaccard similarity s shares a
    # band with probability 1 - (1 - s^8)^14 (0.5 -> 5.4%, 0.7 -> 55.0%, 0.8 -> 92.4%, 0.9 -> 99.9%)
    return {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "seed": 1}


@dataclass
class CleanConfig:
    """What `yulan-tune clean` does; a stage whose settings are null is off. The settings of a heuristic filter are
    the keyword arguments of datatrove's filter of that name (GopherQualityFilter, GopherRepetitionFilter,
    C4QualityFilter, FineWebQualityFilter); `{}` runs it with datatrove's defaults."""

    inputs: list[str] = field(default_factory=list, metadata={"help": "JSONL / Parquet / text files or directories"})
    output_dir: str = field(default="", metadata={"help": "kept/, removed/<stage>/ and work/ go here"})
    name: str = field(default="clean", metadata={"help": "subset name: kept/<name>_scored_dedup/score_<k>/"})
    text_field: str = "text"
    id_field: str = "id"
    txt_split: str = field(default="file", metadata={"help": f"text files: {' | '.join(TXT_SPLITS)}"})
    on_bad_rows: str = field(default="raise", metadata={"help": f"{' | '.join(BAD_ROW_POLICIES)}"})
    language: str = "en"
    tokenizer_refresh_every: int = field(default=20_000, metadata={
        "help": "English: keep spaCy's tokenizer cache across documents, rebuilt every N documents per block (0: "
                "datatrove's per-document memory zones, 8.6x slower to tokenize)"})
    tasks: int = field(default=4, metadata={"help": "shards of the work (the output layout depends on it)"})
    workers: int = field(default=2, metadata={"help": "processes at a time (the output does not depend on it)"})
    unicode: dict | None = field(default_factory=dict, metadata={"help": "FTFYFormatter kwargs; null: off"})
    gopher_quality: dict | None = field(default_factory=dict)
    gopher_repetition: dict | None = field(default_factory=dict)
    c4_quality: dict | None = field(default_factory=lambda: {"filter_no_terminal_punct": False})
    fineweb_quality: dict | None = field(default_factory=dict)
    decontaminate: list[str] = field(default_factory=list, metadata={
        "help": f"evaluation sets: {HELDOUT_MATH} (the bundled held-out math), a JSONL / Parquet / text file, "
                f"or {LM_EVAL_PREFIX}<task> (lm-eval task data, where cached)"})
    decontamination_ngrams: int = 13
    exact_dedup: bool = True
    minhash: dict | None = field(default_factory=_default_minhash, metadata={
        "help": "MinhashConfig kwargs (n_grams, num_buckets, hashes_per_bucket, seed); null: off"})
    scorer: str | None = field(default=None, metadata={
        "help": "a fastText model file (.bin / .ftz) or a Hugging Face sequence-classification directory"})
    scorer_label: str | None = field(default=None, metadata={
        "help": "the label whose probability is the score (fastText: with or without __label__); not needed for "
                "a one-output (regression) classifier"})
    score_edges: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8], metadata={
        "help": "bucket edges: score < edges[0] is score_1, ..., >= edges[-1] is score_<len(edges) + 1>"})
    min_score_bucket: int = field(default=1, metadata={"help": "buckets below this go to removed/quality_score"})
    scorer_batch_size: int = 32

    def __post_init__(self) -> None:
        check_txt_split(self.txt_split)
        check_bad_row_policy(self.on_bad_rows)
        if self.tokenizer_refresh_every < 0:
            raise ValueError(f"tokenizer_refresh_every must be >= 0, got {self.tokenizer_refresh_every}")
        for name in ("tasks", "workers", "decontamination_ngrams", "scorer_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if list(self.score_edges) != sorted(self.score_edges):
            raise ValueError(f"score_edges must be increasing, got {self.score_edges}")
        if not 1 <= self.min_score_bucket <= len(self.score_edges) + 1:
            raise ValueError(f"min_score_bucket must be in 1..{len(self.score_edges) + 1}, got {self.min_score_bucket}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"name must be letters, digits, '_', '.', '-' (a directory name), got {self.name!r}")
        for stage in ("unicode", *HEURISTIC_FILTERS, "minhash"):
            value = getattr(self, stage)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{stage} must be a mapping of settings or null (off), got {value!r}")
        if self.minhash is not None:
            unknown = set(self.minhash) - {f.name for f in dataclasses.fields(MinhashConfig)}
            if unknown:
                raise ValueError(f"minhash: unknown settings {sorted(unknown)} (MinhashConfig fields: n_grams, "
                                 "num_buckets, hashes_per_bucket, seed)")


def parse_config(argv: list[str] | None = None) -> CleanConfig:
    """`--config file.yaml` plus `--field value` overrides, parsed by trl's TrlParser (as the other recipes)."""
    from trl import TrlParser

    (config,) = TrlParser((CleanConfig,)).parse_args_and_config(argv)
    return config


def minhash_detection_probability(similarity: float, bands: int, rows: int) -> float:
    """LSH: the chance that two documents of Jaccard similarity `similarity` agree on all `rows` minhashes of at least
    one of `bands` bands, 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - similarity**rows) ** bands


# ------------------------------------------------------------------------------------------------ evaluation sets


@dataclass(frozen=True)
class EvalText:
    """One evaluation item for the decontamination index: its prompt (`query`) and reference (`label`); the n-grams of
    each and those spanning the two are indexed."""

    task: str
    query: str
    label: str


def heldout_math_texts() -> list[EvalText]:
    """The bundled held-out math problems (question -> worked solution)."""
    from yulan_tune.data.math_problems import generate_problems

    return [EvalText(HELDOUT_MATH, p.question, p.solution)
            for p in generate_problems(HELDOUT_MATH_PROBLEMS, HELDOUT_MATH_SEED, split="test")]


def file_eval_texts(path: str | os.PathLike) -> list[EvalText]:
    """An evaluation set in a local file: every string field of each JSONL / Parquet row (question, answer, ...),
    or a text file's blank-line separated blocks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--decontaminate {path}: no such file (expected {HELDOUT_MATH}, "
                                f"{LM_EVAL_PREFIX}<task>, or a JSONL / Parquet / text file)")
    task = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); expected one object per line")
                rows.append(row if isinstance(row, dict) else {"text": row})
    elif suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix in TEXT_SUFFIXES:
        blocks = BLANK_LINES.split(path.read_text(encoding="utf-8"))
        return [EvalText(task, "", block) for block in blocks if block.strip()]
    else:
        raise ValueError(f"--decontaminate {path}: unsupported file type {suffix!r} (JSONL, Parquet or text)")
    texts = [EvalText(task, "", value) for row in rows for value in row.values()
             if isinstance(value, str) and value.strip()]
    if not texts:
        raise ValueError(f"--decontaminate {path}: no text fields in its {len(rows)} rows")
    return texts


def resolve_eval_texts(sources: Iterable[str],
                       lm_eval_texts: Callable[[str], list[EvalText]] | None = None) -> list[EvalText]:
    """The evaluation items of `sources` (HELDOUT_MATH, `lm-eval:<task>` through `lm_eval_texts`, or files)."""
    texts: list[EvalText] = []
    for source in sources:
        if source == HELDOUT_MATH:
            texts += heldout_math_texts()
        elif source.startswith(LM_EVAL_PREFIX):
            if lm_eval_texts is None:
                raise ValueError(f"{source}: lm-eval task data is resolved by `yulan-tune clean` (the evaluation "
                                 "layer); pass the items as EvalText instead")
            texts += lm_eval_texts(source.removeprefix(LM_EVAL_PREFIX))
        else:
            texts += file_eval_texts(source)
    return texts


def decontamination_config(ngrams: int) -> NGramsDecontConfig:
    # numbers are kept: the default (every digit -> 0) makes templated questions with different numbers collide
    return NGramsDecontConfig(n_grams=ngrams, find_query_ngrams=True, find_overlap_ngrams=True,
                              norm_config=TextNormConfig(norm_numbers=False))


class EvalSetIndex:
    """Writes the n-gram index NGramsDecontFilter reads (`<task>.index.hashes`, uint64 hashes), with the n-grams of
    NGramsDecontIndexer.compute_hashes. The indexer itself cannot be used: its constructor requires lighteval (for
    its task registry), which we do not install."""

    def __init__(self, config: NGramsDecontConfig, language: str = "en"):
        self.config = config
        self.tokenizer = load_word_tokenizer(language)
        self.hash_func = create_hash_func(config.hash_config)

    def compute_hashes(self, label: str, query: str | None = None) -> list[int]:
        return NGramsDecontIndexer.compute_hashes(self, label, query)  # datatrove's n-grams, on our attributes

    def write(self, texts: Iterable[EvalText], folder: str | os.PathLike) -> dict[str, int]:
        import numpy as np

        hashes: dict[str, set[int]] = {}
        for text in texts:
            hashes.setdefault(text.task, set()).update(self.compute_hashes(text.label, text.query))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for task, task_hashes in hashes.items():
            array = np.array(sorted(task_hashes), dtype=self.config.hash_config.np_descr)
            array.tofile(folder / f"{task}.index.hashes")
        return {task: len(task_hashes) for task, task_hashes in hashes.items()}


# ------------------------------------------------------------------------------------------------ word tokenizer


class CachedSpacyTokenizer(SpaCyTokenizer):
    """datatrove's English tokenizer (spaCy's rule-based one) with the same tokens, its cache kept across documents.

    datatrove's SpaCyTokenizer opens a spaCy memory zone per call, which empties the tokenizer's cache every time:
    on 2 busy CPU cores that made each word-level filter cost 15-18 ms per 1,000-character document; with the cache
    kept, word tokenization is 8.6x faster (benchmarks/clean_throughput.py). Memory stays bounded the other way: the
    spaCy pipeline (its string store and cache) is rebuilt every `refresh_every` calls. A datatrove block takes a
    WordTokenizer instance wherever it takes a language (`load_word_tokenizer` passes instances through)."""

    def __init__(self, language: str = "en", refresh_every: int = 20_000):
        super().__init__(language)
        self.refresh_every = refresh_every
        self._calls = 0

    def _docs(self, text: str) -> list:
        self._calls += 1
        if self._calls % self.refresh_every == 0:
            self._tokenizer = None  # rebuilt on next use: drops the strings and cache gathered so far
        self.tokenizer.max_length = len(text) + 10
        return self._do_tokenize(text)

    def word_tokenize(self, text: str) -> list[str]:
        return strip_strings([token.text for chunk in self._docs(text) for token in chunk])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([sent.text for chunk in self._docs(text) for sent in chunk.sents])

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for chunk in self._docs(text):
            start = spans[-1][1] if spans else 0
            spans += [(start + sent.start_char, start + sent.end_char) for sent in chunk.sents]
        return spans

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}  # workers build their own pipeline


def word_tokenizer(config: CleanConfig):
    """What the blocks get as their `language`: the cached English tokenizer, or the language code as it is."""
    if config.tokenizer_refresh_every and config.language in ("en", "eng", "eng_Latn"):
        return CachedSpacyTokenizer("en", config.tokenizer_refresh_every)
    return config.language


# ------------------------------------------------------------------------------------------------ readers


class _BadRows:
    """The bad-row policy of a reader: raise at the first (one line naming file and line) or count and go on."""

    on_bad_rows = "raise"

    def bad_row(self, where: str, message: str) -> None:
        if self.on_bad_rows == "raise":
            # a plain ValueError: it crosses the worker pool intact
            raise ValueError(f"{where}: {message} [--on-bad-rows skip: count and skip such rows]")
        self.stat_update("bad_rows")

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str):
        document = super().get_document_from_dict(data, source_file, id_in_file)
        if document is None:
            self.stat_update("no_text")  # counted, not silently dropped (datatrove only logs the first)
        return document


class CleanJsonlReader(_BadRows, JsonlReader):
    """JSON Lines; a row that is not a JSON object or whose text is not a string is a bad row."""

    name = "JSONL"

    def __init__(self, *args: Any, on_bad_rows: str = "raise", **kwargs: Any):
        super().__init__(*args, compression=None, **kwargs)
        self.on_bad_rows = on_bad_rows

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        with self.data_folder.open(filepath, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as error:
                        self.bad_row(f"{self.data_folder.resolve_paths(filepath)}:{number}",
                                     f"not valid JSON ({error}); expected one object per line")
                        continue
                    if not isinstance(row, dict) or not isinstance(row.get(self.text_key, ""), str):
                        self.bad_row(f"{self.data_folder.resolve_paths(filepath)}:{number}",
                                     f"field '{self.text_key}': expected a string in a JSON object")
                        continue
                    document = self.get_document_from_dict(row, filepath, number - 1)
                if document is not None:
                    yield document


class CleanParquetReader(_BadRows, ParquetReader):
    name = "Parquet"

    def __init__(self, *args: Any, on_bad_rows: str = "raise", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_bad_rows = on_bad_rows


class TextFileReader(_BadRows, BaseDiskReader):
    """Plain-text files: one document per file, or documents separated by blank lines (`txt_split`)."""

    name = "Text"

    def __init__(self, *args: Any, txt_split: str = "file", on_bad_rows: str = "raise", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.txt_split = check_txt_split(txt_split)
        self.on_bad_rows = on_bad_rows

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            self.bad_row(self.data_folder.resolve_paths(filepath), f"not UTF-8 text ({error.reason} at byte "
                                                                   f"{error.start})")
            return
        blocks = [text] if self.txt_split == "file" else BLANK_LINES.split(text)
        for index, block in enumerate(blocks):
            document = self.get_document_from_dict({self.text_key: block}, filepath, index)
            if document is not None:
                yield document


def ignored_files(config: CleanConfig) -> list[str]:
    """Files inside input directories that are not JSONL / Parquet / text (reported, not read)."""
    known = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
    return [str(p) for source in config.inputs if Path(source).expanduser().is_dir()
            for p in sorted(Path(source).expanduser().rglob("*")) if p.is_file() and p.suffix.lower() not in known]


def input_readers(config: CleanConfig) -> list[BaseDiskReader]:
    """One datatrove reader per input file kind and location; chained, they read every input in a fixed order."""
    kinds = ((JSONL_SUFFIXES, CleanJsonlReader), (PARQUET_SUFFIXES, CleanParquetReader),
             (TEXT_SUFFIXES, TextFileReader))
    common = {"text_key": config.text_field, "id_key": config.id_field, "on_bad_rows": config.on_bad_rows}
    readers: list[BaseDiskReader] = []
    if not config.inputs:
        raise ValueError("no inputs: give JSONL / Parquet / text files or directories of them")
    for source in config.inputs:
        path = Path(source).expanduser().resolve()
        extra = lambda reader: {"txt_split": config.txt_split} if reader is TextFileReader else {}  # noqa: E731
        if path.is_file():
            match = [reader for suffixes, reader in kinds if path.suffix.lower() in suffixes]
            if not match:
                raise ValueError(f"{source}: unsupported file type {path.suffix!r} (expected JSON Lines "
                                 f"{JSONL_SUFFIXES}, Parquet {PARQUET_SUFFIXES} or text {TEXT_SUFFIXES})")
            readers.append(match[0](str(path.parent), glob_pattern=path.name, recursive=False,
                                    **common, **extra(match[0])))
        elif path.is_dir():
            found = False
            for suffixes, reader in kinds:
                for suffix in suffixes:
                    if any(path.rglob(f"*{suffix}")):
                        found = True
                        readers.append(reader(str(path), glob_pattern=f"**/*{suffix}", **common, **extra(reader)))
            if not found:
                raise FileNotFoundError(f"{source}: no JSONL / Parquet / text files in this directory")
        else:
            raise FileNotFoundError(f"{source}: no such file or directory")
    return readers


# ------------------------------------------------------------------------------------------------ steps


class RemovedWriter(JsonlWriter):
    """The exclusion writer of a stage: removed documents as JSON Lines in `removed/<stage>/`, each with its
    `filter_reason` (the stage's own when the block gives none, as the dedup blocks do)."""

    def __init__(self, folder: str | os.PathLike, reason: str):
        super().__init__(str(folder), output_filename=SHARD, compression=None)
        self.reason = reason

    def write(self, document: Document, rank: int = 0, **kwargs: Any) -> None:
        document.metadata.setdefault("filter_reason", self.reason)
        super().write(document, rank, **kwargs)


class NonEmptyFilter(BaseFilter):
    """Drops documents left without text (after normalization or C4's line removal): an empty document cannot be
    read back from an intermediate shard, which would shift the document indexes the dedup stages rely on."""

    name = "non-empty"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return bool(doc.text.strip()) or (False, "no text left")


class ScoreBuckets(BaseFilter):
    """Scores each document with `scorer` (a fastText model file, or a Hugging Face sequence-classification
    directory: the probability of `label`, or the single output of a regression head) and files it under
    `<name>_scored_dedup/score_<k>` (k = 1 + the number of `edges` at or below the score); documents below
    `min_bucket` are removed."""

    name = "quality score"

    def __init__(self, scorer: str, *, label: str | None, edges: list[float], min_bucket: int, subset: str,
                 batch_size: int = 32, exclusion_writer: JsonlWriter | None = None):
        super().__init__(exclusion_writer, batch_size=batch_size)
        path = Path(scorer)
        if not path.exists():
            raise FileNotFoundError(f"scorer {scorer}: no such file or directory (a fastText model file or a Hugging "
                                    "Face sequence-classification directory)")
        self.scorer, self.kind = str(path), "hf" if path.is_dir() else "fasttext"
        self.label, self.edges, self.min_bucket, self.subset = label, list(edges), min_bucket, subset
        self._model: Any = None

    def _load(self) -> None:
        if self.kind == "fasttext":
            import fasttext

            model = fasttext.load_model(self.scorer)
            labels = [name.removeprefix("__label__") for name in model.get_labels()]
            label = (self.label or "").removeprefix("__label__")
            if label not in labels:
                raise ValueError(f"scorer {self.scorer}: scorer_label must be one of its labels {labels}, "
                                 f"got {self.label!r}")
            self._model, self._label = model, f"__label__{label}"
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(1)  # one per worker process: the workers are the parallelism
        tokenizer = AutoTokenizer.from_pretrained(self.scorer, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(self.scorer, local_files_only=True,
                                                                   use_safetensors=True).eval()
        if model.config.num_labels == 1:
            index = None
        else:
            names = {str(v): int(k) for k, v in model.config.id2label.items()}
            if self.label not in names:
                raise ValueError(f"scorer {self.scorer}: scorer_label must be one of its labels {sorted(names)}, "
                                 f"got {self.label!r}")
            index = names[self.label]
        self._model, self._tokenizer, self._index = model, tokenizer, index

    def scores(self, texts: list[str]) -> list[float]:
        if self._model is None:
            self._load()
        if self.kind == "fasttext":
            out = []
            for text in texts:
                labels, probs = self._model.predict(text.replace("\n", " "), k=-1)
                # fastText's softmax can come out a hair above 1 (1.00001): a probability is clipped to [0, 1]
                out.append(min(1.0, max(0.0, float(dict(zip(labels, probs)).get(self._label, 0.0)))))
            return out
        import torch

        batch = self._tokenizer(texts, truncation=True, max_length=512, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self._model(**batch).logits.float()
        if self._index is None:
            return logits[:, 0].tolist()
        return torch.softmax(logits, dim=-1)[:, self._index].tolist()

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        results: list[bool | tuple[bool, str]] = []
        for doc, score in zip(batch, self.scores([doc.text for doc in batch])):
            bucket = 1 + bisect.bisect_right(self.edges, score)
            doc.metadata["quality_score"] = round(score, 6)
            doc.metadata["score_subset"] = f"{self.subset}/score_{bucket}"
            self.stat_update(f"score_{bucket}")
            results.append(True if bucket >= self.min_bucket else (False, f"score bucket {bucket} < "
                                                                          f"{self.min_bucket}"))
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]


def document_text(doc: Document) -> str:  # the exact-dedup key (its return annotation picks datatrove's hash input)
    return doc.text


# ------------------------------------------------------------------------------------------------ the run


@contextlib.contextmanager
def _stderr_to(path: Path, enabled: bool = True) -> Iterator[None]:
    """datatrove's per-task log lines (and its workers', forked from here) go to `path` instead of the console."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _read_stats(logging_dir: Path) -> list[dict]:
    """Per-step counters of a stage summed over its tasks (datatrove's stats/<rank>.json; every task, also those
    done before a resume)."""
    merged: list[dict] = []
    for path in sorted((logging_dir / "stats").glob("*.json")):
        steps = json.loads(path.read_text())
        for index, step in enumerate(steps):
            if index == len(merged):
                merged.append({"name": step["name"], "stats": {}})
            for key, value in step["stats"].items():
                if isinstance(value, dict) and "total" in value:
                    value = value["total"]
                if isinstance(value, (int, float)):
                    merged[index]["stats"][key] = merged[index]["stats"].get(key, 0) + value
    return merged


class CleanRecipe:
    """Runs the cleaning pipeline of a CleanConfig; `run()` returns the per-stage table and the run's numbers."""

    def __init__(self, config: CleanConfig, eval_texts: list[EvalText] | None = None, *, progress: bool = True,
                 quiet_library: bool = True):
        self.config = config
        self.eval_texts = eval_texts  # resolved evaluation sets (else resolved here from config.decontaminate)
        self.progress = progress
        self.quiet_library = quiet_library
        self.out = Path(config.output_dir).expanduser().resolve() if config.output_dir else None
        if self.out is None:
            raise ValueError("output_dir (--out) is required")

    # -- layout
    @property
    def work(self) -> Path:
        return self.out / "work"

    def removed(self, stage: str) -> RemovedWriter:
        return RemovedWriter(self.out / "removed" / stage, reason=REMOVAL_REASONS.get(stage, stage))

    def fingerprint(self) -> dict:
        values = dataclasses.asdict(self.config)
        values.pop("workers")  # the output does not depend on it
        values["inputs"] = [str(Path(p).expanduser().resolve()) for p in values["inputs"]]
        values.pop("output_dir")
        if self.eval_texts is not None:
            digest = hashlib.sha256(json.dumps([dataclasses.astuple(t) for t in self.eval_texts]).encode())
            values["eval_texts_sha256"] = digest.hexdigest()
        return values

    def _claim_output(self, overwrite: bool) -> None:
        run_file = self.work / RUN_FILE
        wanted = self.fingerprint()
        if run_file.is_file() and json.loads(run_file.read_text()) != wanted and not overwrite:
            raise ValueError(f"{self.out} holds a clean run of other inputs or settings; pass --overwrite to "
                             "replace it, or choose another --out")
        if overwrite or not run_file.is_file():  # else: resume (datatrove skips the tasks marked completed)
            for sub in ("kept", "removed", "work"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(wanted, indent=1) + "\n")

    def _stage(self, name: str, pipeline: list, tasks: int) -> list[dict]:
        logging_dir = self.work / "logs" / name
        executor = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(self.config.workers, tasks),
                                         logging_dir=str(logging_dir), skip_completed=True, start_method="fork")
        with _stderr_to(self.work / "logs" / f"{name}.console.log", enabled=self.quiet_library):
            executor.run()
        return _read_stats(logging_dir)

    def _shards(self, folder: Path) -> str:
        """Every task's shard of an intermediate folder (an empty one for a task that kept nothing), as the
        paths file of the next stage's reader: task r reads exactly the shard task r wrote."""
        for rank in range(self.config.tasks):
            (folder / f"{rank:05d}.jsonl").touch()
        paths = folder / "shards.txt"
        paths.write_text("".join(f"{rank:05d}.jsonl\n" for rank in range(self.config.tasks)))
        return str(paths)

    def run(self, overwrite: bool = False) -> dict[str, Any]:
        import time

        from yulan_tune.console import progress

        c = self.config
        self._claim_output(overwrite)
        started = time.time()
        readers = input_readers(c)
        tokenizer = word_tokenizer(c)
        stages = ["filter"] + (["exact_find", "exact_filter"] if c.exact_dedup else []) \
            + (["minhash_signature", "minhash_buckets", "minhash_cluster"] if c.minhash is not None else []) \
            + ["keep"]
        bar = progress(total=len(stages), desc="clean", unit="stage", enabled=self.progress)
        stats: dict[str, list[dict]] = {}
        index_sizes: dict[str, int] = {}

        def advance(stage: str, result: list[dict]) -> None:
            stats[stage] = result
            bar.set_postfix_str(stage)
            bar.update()

        # stage 1: read -> normalize -> heuristic filters -> decontamination -> work/filtered
        steps: list[PipelineStep] = list(readers)
        if c.unicode is not None:
            steps.append(FTFYFormatter(**c.unicode))
        for stage, block in HEURISTIC_FILTERS.items():
            settings = getattr(c, stage)
            if settings is not None:
                steps.append(block(**settings, exclusion_writer=self.removed(stage), language=tokenizer))
        decont = decontamination_config(c.decontamination_ngrams)
        if c.decontaminate or self.eval_texts:
            texts = self.eval_texts if self.eval_texts is not None else resolve_eval_texts(c.decontaminate)
            index_dir = self.work / "decontamination_index"
            shutil.rmtree(index_dir, ignore_errors=True)
            index_sizes = EvalSetIndex(decont, tokenizer).write(texts, index_dir)
            steps.append(NGramsDecontFilter(str(index_dir), config=decont, language=tokenizer,
                                            exclusion_writer=self.removed("decontamination")))
        steps.append(NonEmptyFilter(exclusion_writer=self.removed("empty")))  # normalization, C4 may empty one
        filtered = self.work / "filtered"
        steps.append(JsonlWriter(str(filtered), output_filename=SHARD, compression=None))
        exact = ExactDedupConfig(content_getter=document_text)
        if c.exact_dedup:
            steps.append(ExactDedupSignature(str(self.work / "exact_signatures"), config=exact))
        advance("filter", self._stage("filter", steps, c.tasks))
        current = filtered

        if c.exact_dedup:
            advance("exact_find", self._stage("exact_find", [ExactFindDedups(
                str(self.work / "exact_signatures"), str(self.work / "exact_duplicates"), config=exact)], 1))
            deduped = self.work / "exact_deduped"
            steps = [JsonlReader(str(current), paths_file=self._shards(current), compression=None),
                     ExactDedupFilter(str(self.work / "exact_duplicates"), config=exact,
                                      exclusion_writer=self.removed("exact_dedup")),
                     JsonlWriter(str(deduped), output_filename=SHARD, compression=None)]
            advance("exact_filter", self._stage("exact_filter", steps, c.tasks))
            current = deduped

        minhash = MinhashConfig(**c.minhash) if c.minhash is not None else None
        if minhash is not None:
            signatures, buckets, clusters = (self.work / f"minhash_{n}" for n in ("signatures", "buckets", "clusters"))
            steps = [JsonlReader(str(current), paths_file=self._shards(current), compression=None),
                     MinhashDedupSignature(str(signatures), config=minhash, language=tokenizer)]
            advance("minhash_signature", self._stage("minhash_signature", steps, c.tasks))
            advance("minhash_buckets", self._stage("minhash_buckets", [
                MinhashDedupBuckets(str(signatures), str(buckets), config=minhash)], minhash.num_buckets))
            advance("minhash_cluster", self._stage("minhash_cluster", [
                MinhashDedupCluster(str(buckets), str(clusters), config=minhash)], 1))

        steps = [JsonlReader(str(current), paths_file=self._shards(current), compression=None)]
        if minhash is not None:
            steps.append(MinhashDedupFilter(str(clusters), exclusion_writer=self.removed("minhash_dedup")))
        if c.scorer:
            steps.append(ScoreBuckets(c.scorer, label=c.scorer_label, edges=c.score_edges,
                                      min_bucket=c.min_score_bucket, subset=f"{c.name}_scored_dedup",
                                      batch_size=c.scorer_batch_size,
                                      exclusion_writer=self.removed("quality_score")))
        steps.append(JsonlWriter(str(self.out / "kept"), compression=None,
                                 output_filename="${score_subset}/" + SHARD if c.scorer else SHARD))
        advance("keep", self._stage("keep", steps, c.tasks))
        bar.close()
        seconds = time.time() - started
        table = stage_table(stats)
        read = table[0]["out"] if table else 0
        kept = table[-1]["out"] if table else 0
        result = {"stages": table, "documents_read": read, "documents_kept": kept, "seconds": round(seconds, 2),
                  "documents_per_second": round(read / seconds, 1) if seconds > 0 else None,
                  "decontamination_index": index_sizes, "score_buckets": score_buckets(stats.get("keep", [])),
                  "kept_dir": str(self.out / "kept"), "removed_dir": str(self.out / "removed"),
                  "ignored_files": ignored_files(c),
                  "minhash": dataclasses.asdict(minhash) if minhash else None}
        return result


def _step_named(steps: list[dict], name: str) -> list[dict]:
    return [s for s in steps if s["name"].endswith(name)]


def stage_table(stats: dict[str, list[dict]]) -> list[dict]:
    """Rows (stage, in, removed, out) in pipeline order, from datatrove's counters."""
    rows: list[dict] = []
    filter_steps = stats.get("filter", [])
    read = sum(s["stats"].get("documents", 0) for s in filter_steps if "READER" in s["name"])
    no_text = sum(s["stats"].get("no_text", 0) for s in filter_steps if "READER" in s["name"])
    bad = sum(s["stats"].get("bad_rows", 0) for s in filter_steps if "READER" in s["name"])
    rows.append({"stage": "read", "in": read + no_text + bad, "removed": no_text + bad, "out": read,
                 "detail": {"no_text": no_text, "bad_rows": bad}})
    names = {"non-empty": "empty", "Gopher Quality": "gopher_quality", "Gopher Repetition": "gopher_repetition",
             "C4 Quality": "c4_quality", "FineWeb Quality": "fineweb_quality", "N-grams decontaminate":
             "decontamination", "exact-deduplication stage 3": "exact_dedup", "MinHash stage 4": "minhash_dedup",
             "quality score": "quality_score"}
    for stage in ("filter", "exact_filter", "keep"):
        for step in stats.get(stage, []):
            label = next((v for k, v in names.items() if step["name"].endswith(k)), None)
            if label is None:
                continue
            s = step["stats"]
            dropped = s.get("dropped", 0)
            total = s.get("total", s.get("forwarded", 0) + dropped)
            detail = {k.removeprefix("dropped_"): v for k, v in s.items() if k.startswith("dropped_")}
            rows.append({"stage": label, "in": total, "removed": dropped, "out": total - dropped, "detail": detail})
    return rows


def score_buckets(keep_steps: list[dict]) -> dict[str, int]:
    for step in keep_steps:
        if step["name"].endswith("quality score"):
            return {k: v for k, v in sorted(step["stats"].items()) if k.startswith("score_")}
    return {}


def format_table(rows: list[dict]) -> list[str]:
    lines = [f"{'stage':<18} {'in':>10} {'removed':>10} {'kept':>10}"]
    for row in rows:
        lines.append(f"{row['stage']:<18} {row['in']:>10,} {row['removed']:>10,} {row['out']:>10,}")
    return lines
