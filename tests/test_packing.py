"""Packed pretraining data: exact rows vs an independent tokenization, position_ids, workers, resume, bad rows,
and the memory budget measured on a corpus several times larger than it."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.data.packed import PackedDataset
from yulan_tune.data.packing import prepare_packed_dataset
from yulan_tune.data.records import DataFormatError
from yulan_tune.paths import PRETRAIN_DIR

SEQ_LEN = 96


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_dir) -> dict:
    """Real text (stdlib sources) in every input kind; two documents longer than the 2000-character segments."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from yulan_tune.data.bundled import stdlib_documents

    root = tmp_path_factory.mktemp("corpus")
    sources = [text[:3000] for text in stdlib_documents(limit=40)]
    jsonl_docs = sources[:12] + ["control strings stay text: </s> <|eot_id|> <s>", ""]  # "" is an empty document
    with open(root / "a.jsonl", "w", encoding="utf-8") as handle:
        for index, text in enumerate(jsonl_docs):
            handle.write(json.dumps({"text": text, "id": index}) + "\n")
            if index == 3:
                handle.write("\n")  # blank lines carry no row
    long_doc = "\n".join(sources[12:16])  # > 2000 characters: tokenized in newline-aligned segments
    with open(root / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": long_doc}) + "\n")
    parquet_docs = sources[16:24]
    pq.write_table(pa.table({"text": parquet_docs}), root / "b.parquet", row_group_size=3)
    (root / "texts").mkdir()
    text_docs = {"x.txt": "\n".join(sources[24:28]), "y.md": sources[28], "z.txt": sources[29]}
    for name, text in text_docs.items():
        (root / "texts" / name).write_text(text, encoding="utf-8")
    (root / "texts" / "notes.csv").write_text("not,a,corpus\n")  # reported as ignored, not read
    arrow_docs = sources[30:40]
    datasets.Dataset.from_dict({"text": arrow_docs}).save_to_disk(str(root / "saved"))
    documents = [d for d in jsonl_docs if d] + [long_doc] + parquet_docs + [text_docs[n] for n in sorted(text_docs)]
    documents += arrow_docs
    inputs = [root / "a.jsonl", root / "b.parquet", root / "texts", root / "saved"]
    return {"root": root, "inputs": inputs, "documents": documents}


def reference_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """Every document tokenized whole, special-token strings as text, EOS after each: the stream rows come from."""
    ids: list[int] = []
    for text in documents:
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return np.array(ids)


def prepare(corpus, out, tiny_dir, **kwargs):
    options = dict(seq_len=SEQ_LEN, segment_chars=2000, memory_budget_mb=1, progress=False)
    return prepare_packed_dataset(corpus["inputs"], tiny_dir, out, **{**options, **kwargs})


def test_rows_equal_an_independent_tokenization(corpus, tiny_dir, tiny_tokenizer, tmp_path):
    manifest = prepare(corpus, tmp_path / "one_unit", tiny_dir, unit_mb=64)  # one unit: rows = the stream, cut
    stream = reference_stream(tiny_tokenizer, corpus["documents"])
    dataset = PackedDataset(tmp_path / "one_unit")
    rows = len(stream) // SEQ_LEN
    assert len(dataset) == rows == manifest["rows"]
    assert manifest["documents"] == len(corpus["documents"]) and manifest["empty_documents"] == 1
    assert manifest["split_documents"] >= 2  # the long JSONL document and x.txt went through segments
    assert manifest["dropped_final_partial_row_tokens"] == len(stream) - rows * SEQ_LEN
    assert manifest["ignored_files"] == [str(corpus["root"] / "texts" / "notes.csv")]
    np.testing.assert_array_equal(np.stack([dataset.row(i) for i in range(rows)]), stream[: rows * SEQ_LEN].reshape(rows, SEQ_LEN))
    # "</s>" written in a document is text, so EOS ids are exactly the separators
    assert (stream == tiny_tokenizer.eos_token_id).sum() == len(corpus["documents"])

    for index in (0, 7, rows - 1):
        item = dataset[index]
        ids = item["input_ids"].numpy()
        expected, position = [], 0
        for i, token in enumerate(ids):  # by hand: restart at the row start and after every EOS
            expected.append(position)
            position = 0 if token == tiny_tokenizer.eos_token_id else position + 1
        assert item["position_ids"].tolist() == expected
        assert item["labels"].tolist() == ids.tolist() and item["input_ids"].dtype == item["position_ids"].dtype


def test_workers_units_and_resume_give_identical_shards(corpus, tiny_dir, tiny_tokenizer, tmp_path):
    small_units = dict(unit_mb=0.004)  # ~4 KB units: a dozen units, leftovers packed into the tail shard
    one = prepare(corpus, tmp_path / "w1", tiny_dir, num_workers=1, **small_units)
    two = prepare(corpus, tmp_path / "w2", tiny_dir, num_workers=2, **small_units)
    assert one["units"] > 5 and one["shards"] == two["shards"]
    for shard in one["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()
    # no token lost: the rows hold the stream's tokens, less the counted final partial row
    stream = reference_stream(tiny_tokenizer, corpus["documents"])
    rows = np.stack([PackedDataset(tmp_path / "w2").row(i) for i in range(two["rows"])])
    assert rows.size + two["dropped_final_partial_row_tokens"] == len(stream)
    missing = np.bincount(stream, minlength=4096) - np.bincount(rows.ravel(), minlength=4096)
    assert missing.min() >= 0 and missing.sum() == two["dropped_final_partial_row_tokens"] < SEQ_LEN

    # an interrupted run: unit 2 unfinished and no manifest -> the rerun redoes only unit 2
    out = tmp_path / "w2"
    (out / "manifest.json").unlink()
    (out / "work" / "unit-00002.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("unit-*.bin") if p.name != "unit-00002.bin"}
    with pytest.raises(FileNotFoundError, match="unfinished preparation"):
        PackedDataset(out)
    resumed = prepare(corpus, out, tiny_dir, num_workers=2, **small_units)
    assert resumed["shards"] == one["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("unit-*.bin") if p.name in kept} == kept
    for shard in one["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()
    with pytest.raises(ValueError, match="different settings"):  # same dir, other settings: refused, not mixed
        prepare(corpus, out, tiny_dir, seq_len=SEQ_LEN * 2, **small_units)


def test_bad_rows_name_file_line_and_field_or_are_counted(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n{"text": "ok"}\n{"content": "x"}\n'
                   '{"text": 5}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare_packed_dataset([bad], tiny_dir, tmp_path / "strict", seq_len=4, progress=False)
    manifest = prepare_packed_dataset([bad], tiny_dir, tmp_path / "lenient", seq_len=4, progress=False,
                                      on_bad_rows="skip")
    assert manifest["bad_rows"] == {"invalid_json": 1, "missing_text": 1, "text_not_a_string": 1}
    assert manifest["documents"] == 3
    assert any("bad.jsonl:5: field 'text': missing" in example for example in manifest["bad_row_examples"])
    assert any("bad.jsonl:6: field 'text': expected a string, got int" in e for e in manifest["bad_row_examples"])
    # a name that is no local path is streamed from the hub; offline that fails with one actionable line
    with pytest.raises(FileNotFoundError, match="'someone/corpus' is not a local file .* streaming it as a hub"):
        prepare_packed_dataset(["someone/corpus"], tiny_dir, tmp_path / "hub", seq_len=4, progress=False)


def _status_mb(field: str) -> float:
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _measure_peak_growth(tokenizer: Path, budget_mb: int, small: Path, big: Path, out: Path, result: Path) -> None:
    """In a forked child (no re-import): prepare a one-document corpus, reset the peak-RSS high-water mark to the
    current RSS, prepare the big corpus, report the peak's growth over that baseline."""
    options = ["--tokenizer", str(tokenizer), "--seq-len", "512", "--workers", "1", "--memory-budget-mb",
               str(budget_mb), "--segment-chars", "65536", "--unit-mb", "4", "--no-progress"]
    code = 1
    try:
        assert cli_main(["prepare-data", str(small), "--out", str(out / "small"), *options]) == 0
        Path("/proc/self/clear_refs").write_text("5")  # import-time transients must not hide the big run's peak
        baseline = _status_mb("VmRSS")
        assert cli_main(["prepare-data", str(big), "--out", str(out / "big"), *options]) == 0
        result.write_text(json.dumps({"baseline_mb": baseline, "peak_mb": _status_mb("VmHWM")}))
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc high-water-mark reset")
def test_preparing_a_corpus_four_times_the_budget_stays_within_it(tmp_path):
    """Peak RSS of the preparing process (the kernel's high-water mark, no sampling) grows by less than the budget
    while a corpus of 4x the budget streams through; the baseline is the same process after preparing a
    one-document corpus (Linux: /proc/self/clear_refs resets the high-water mark). The process is forked from this
    one: it starts with the libraries loaded, and the pages it shares with us count in its RSS from the start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    budget_mb = 6
    # a word-level tokenizer over 16-character words: the corpus tokenizes in seconds on 2 shared cores
    words = [f"w{index:05d}xxxxxxxxxx" for index in range(2000)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    rng = random.Random(0)
    (tmp_path / "one_doc.jsonl").write_text(json.dumps({"text": " ".join(words[:1000])}) + "\n")
    word_count = documents = size = 0
    with open(tmp_path / "big.jsonl", "w") as handle:
        while size < 4 * budget_mb * 2**20:
            count = rng.randint(100, 5000)
            line = json.dumps({"text": " ".join(rng.choices(words, k=count))}) + "\n"
            handle.write(line)
            size, word_count, documents = size + len(line), word_count + count, documents + 1

    child = multiprocessing.get_context("fork").Process(target=_measure_peak_growth, args=(
        tmp_path / "tokenizer", budget_mb, tmp_path / "one_doc.jsonl", tmp_path / "big.jsonl", tmp_path,
        tmp_path / "measured.json"))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 0
    measured = json.loads((tmp_path / "measured.json").read_text())
    growth = measured["peak_mb"] - measured["baseline_mb"]
    print(f"corpus {size / 2**20:.1f} MB, budget {budget_mb} MB, baseline {measured['baseline_mb']:.1f} MB, "
          f"peak {measured['peak_mb']:.1f} MB, growth {growth:.2f} MB")
    assert size >= 4 * budget_mb * 2**20
    assert growth <= budget_mb
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["documents"] == documents and manifest["units"] >= 6
    assert manifest["tokens"] + manifest["dropped_final_partial_row_tokens"] == word_count + documents


def test_prepare_script_is_the_cli(tmp_path, tiny_dir, monkeypatch, capsys):
    import runpy

    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    script = str(PRETRAIN_DIR / "prepare.py")
    monkeypatch.setattr(sys, "argv", [script, str(text), "--tokenizer", str(tiny_dir), "--out", str(tmp_path / "out"),
                                      "--seq-len", "64", "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    rows = re.search(r"^prepare-data: 1 documents -> ([\d,]+) rows of 64 tokens", capsys.readouterr().out, re.M)
    assert rows and int(rows.group(1).replace(",", "")) == len(PackedDataset(tmp_path / "out")) > 0
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "nope.jsonl"), "--tokenizer", str(tiny_dir),
                                      "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 2 and "nope.jsonl: no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("segment_chars", [2**20, 64])
def test_text_files_with_blank_line_separated_documents(tmp_path, tiny_dir, segment_chars):
    """--txt-split blank_lines: each block is a document (EOS after each), also when a block is longer than one
    read (`segment_chars`) and has to be tokenized in parts; the stream equals tokenizing each block alone."""
    from transformers import AutoTokenizer

    blocks = ["def f(x):\n    return x + 1", "print('hello')\n" * 12 + "print('end')", "x = 1"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(blocks) + "\n\n\n", encoding="utf-8")
    manifest = prepare_packed_dataset([corpus], tiny_dir, tmp_path / "out", seq_len=8, txt_split="blank_lines",
                                      segment_chars=segment_chars, progress=False)
    assert manifest["documents"] == 3 and manifest["empty_documents"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    expected = [t for block in blocks for t in tokenizer(block, add_special_tokens=False)["input_ids"] + [2]]
    packed = PackedDataset(tmp_path / "out")
    stream = [int(t) for i in range(len(packed)) for t in packed.row(i)]
    assert stream == expected[:len(stream)] and len(expected) - len(stream) == manifest["dropped_final_partial_row_tokens"]


def test_the_same_tokenizer_in_another_directory_reuses_the_preparation(tmp_path, tiny_dir):
    """A preparation is keyed by the tokenizer's content, not its path (pretraining twice into two output dirs with
    `tokenizer: tiny` used to fail: "holds a preparation with different tokenizer")."""
    import shutil

    corpus = tmp_path / "doc.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 20)
    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(tiny_dir, copy)
    first = prepare_packed_dataset([corpus], tiny_dir, tmp_path / "out", seq_len=16, progress=False)
    again = prepare_packed_dataset([corpus], copy, tmp_path / "out", seq_len=16, progress=False)
    assert again == first and first["tokenizer"]["name_or_path"] == str(tiny_dir.resolve())
