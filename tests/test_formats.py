"""SFT data formats x sources, actionable validation errors, skip accounting, and `yulan-tune check-data`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.data.formats import length_stats, load_sft_examples
from yulan_tune.data.records import DataFormatError, iter_records, parse_columns

# one row per format, and the messages each one must normalize to (written by hand, not by the parser)
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]},
    {"instruction": "Add the numbers.", "input": "3 and 5", "output": "8"},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"text": "def f():\n    return 1\n"},
]
EXPECTED = [
    ("messages", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}], None),
    ("sharegpt", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}], None),
    ("alpaca", [{"role": "user", "content": "Add the numbers.\n\n3 and 5"}, {"role": "assistant", "content": "8"}],
     None),
    ("prompt_completion", [{"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris."}], None),
    ("text", None, "def f():\n    return 1\n"),
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _columns(rows: list[dict]) -> dict[str, list]:
    """Column-wise with the union of all keys (from_pylist / from_list would keep only row 0's keys)."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


def _write_source(kind: str, tmp_path: Path) -> tuple[Path, list[int]]:
    """ROWS stored as `kind`; returns the source and the expected `line` of each row."""
    if kind == "jsonl":
        return _write_jsonl(tmp_path / "d.jsonl", ROWS), [1, 2, 3, 4, 5]
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
        return tmp_path / "d.json", [0, 1, 2, 3, 4]
    if kind == "csv":  # nested columns as JSON text, as spreadsheets and pandas.to_csv store them
        import csv

        columns = ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text"]
        with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in ROWS:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
        return tmp_path / "d.csv", [2, 3, 4, 5, 6]
    if kind == "parquet":
        pq.write_table(pa.Table.from_pydict(_columns(ROWS)), tmp_path / "d.parquet")
        return tmp_path / "d.parquet", [0, 1, 2, 3, 4]
    if kind == "dir":  # two files, read in sorted order
        (tmp_path / "data").mkdir()
        _write_jsonl(tmp_path / "data" / "a.jsonl", ROWS[:2])
        (tmp_path / "data" / "b.json").write_text(json.dumps(ROWS[2:]), encoding="utf-8")
        return tmp_path / "data", [1, 2, 0, 1, 2]
    if kind == "datasets":
        from datasets import Dataset, DatasetDict

        DatasetDict({"train": Dataset.from_dict(_columns(ROWS)), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
            str(tmp_path / "saved"))
        return tmp_path / "saved", [0, 1, 2, 3, 4]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dir", "datasets"])
def test_every_format_from_every_source(kind: str, tmp_path: Path) -> None:
    source, lines = _write_source(kind, tmp_path)
    examples, report = load_sft_examples(source)
    assert not report and report.total_skipped == 0
    assert [(e.format, e.messages, e.text) for e in examples] == EXPECTED
    assert [e.line for e in examples] == lines
    if kind == "dir":
        assert [Path(e.source).name for e in examples] == ["a.jsonl"] * 2 + ["b.json"] * 3
    if kind == "datasets":
        test_split, _ = load_sft_examples(source, split="test")
        assert [e.messages for e in test_split] == [EXPECTED[0][1]]


def test_csv_multiline_field_reports_the_row_start(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('prompt,completion\n"a\nb\nc",x\nq,\n', encoding="utf-8")
    assert [r.line for r in iter_records(path)] == [2, 5]
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:5: field 'completion': missing")):
        load_sft_examples(path)  # an empty CSV cell is a missing value


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
         "field 'messages[1].role': expected one of system/user/assistant/tool, got 'bot'"),
        ({"messages": []}, "field 'messages': expected a non-empty list of turns, got []"),
        ({"messages": [{"role": "user", "content": "a"}]},
         "field 'messages': expected at least one assistant turn (nothing to train on), got roles ['user']"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]},
         "field 'messages[1].content': expected a string, got int"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
         "field 'messages[0].content': missing; the turn has fields ['role']"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
         "field 'conversations[1].from': expected one of system/human/user/gpt/assistant/tool/observation, "
         "got 'robot'"),
        ({"instruction": "a", "input": "b"},
         "field 'output': missing (Alpaca rows need 'instruction' and 'output', 'input' is optional)"),
        ({"prompt": "a"}, "field 'completion': missing (prompt/completion rows need both)"),
        ({"text": ["x"]}, "field 'text': expected a string, got list"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                       {"role": "assistant", "content": "b"}]},
         "field 'messages[0].content[0].type': expected a text part, got type 'image_url' (YuLan models read text "
         "only)"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                       {"role": "assistant", "content": "b"}]},
         "field 'messages[0].content[0].text': expected a string, got int"),
        ({"question": "a", "answer": "b"},
         "no known format: expected a field 'messages', 'conversations' (ShareGPT), 'instruction'+'output' "
         "(Alpaca), 'prompt'+'completion' or 'text'; got fields ['answer', 'question']"),
    ],
)
def test_errors_name_file_line_field_and_expectation(row: dict, expected: str, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "train.jsonl", [ROWS[3], ROWS[3], row])
    with pytest.raises(DataFormatError) as error:
        load_sft_examples(path)
    assert str(error.value) == f"{path}:3: {expected}"


def test_invalid_json_and_non_object_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: invalid JSON (Expecting value at column 15); "
                                                        "expected one JSON object per line")):
        load_sft_examples(path)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([ROWS[0], "just a string"]), encoding="utf-8")
    with pytest.raises(DataFormatError, match=re.escape(f"{listed}[1]: expected a JSON object per row, got str")):
        load_sft_examples(listed)


def test_skip_mode_keeps_good_rows_and_counts_every_bad_one(tmp_path: Path) -> None:
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    no_assistant = {"conversations": [{"from": "human", "value": "a"}]}
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps(bad_role), json.dumps(ROWS[2]), "", json.dumps(bad_role),
             json.dumps(no_assistant), "[1, 2]", json.dumps(bad_role), json.dumps(bad_role), json.dumps(ROWS[4])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    examples, report = load_sft_examples(path, on_bad_rows="skip")
    assert [(e.line, e.format) for e in examples] == [(1, "messages"), (4, "alpaca"), (11, "text")]
    assert report.counts == {"invalid_json": 1, "unknown_role": 4, "no_assistant_turn": 1, "not_an_object": 1}
    assert report.total_skipped == 7
    summary = report.summary().splitlines()
    assert summary[0].startswith(f"unknown_role: 4 skipped, e.g. {path}:3: field 'messages[1].role'")
    assert summary[0].count(f"{path}:") == 3 and f"{path}:10" not in summary[0]  # first 3 locations only
    # truncation is counted but keeps the row
    report.add("too_long_truncated", f"{path}:1", "70 tokens > 64")
    assert report.total_skipped == 7 and "too_long_truncated: 1 changed" in report.summary()


def test_offline_hub_name_fails_with_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of 25 s of retries
    with pytest.raises(FileNotFoundError, match=r"'no-such-org/no-such-set' is not a local file or directory, and "
                                                 r"loading it as a hub dataset failed"):
        list(iter_records("no-such-org/no-such-set"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file or directory"):
        list(iter_records("data/missing.jsonl"))


def test_length_stats_nearest_rank() -> None:
    assert length_stats(list(range(1, 101))) == {"min": 1, "median": 50.5, "p95": 95, "max": 100, "mean": 50.5}


def test_check_data_reports_counts_lengths_and_marks_trained_spans(tiny_dir: Path, tiny_tokenizer, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from yulan_tune.data.chat import tokenize_conversation, tokenize_text

    bad = {"messages": [{"role": "user", "content": "a"}]}
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS + [bad])
    code = cli_main(["check-data", str(path), "--model", str(tiny_dir), "--max-length", "30"])
    out = capsys.readouterr().out
    assert code == 1  # one row is unusable
    assert f"{path}: 5 valid samples, 1 skipped" in out
    assert "formats: messages 1, sharegpt 1, alpaca 1, prompt_completion 1, text 1" in out
    lengths = [len(tokenize_conversation(tiny_tokenizer, m).input_ids) for _, m, _ in EXPECTED[:4]]
    lengths.append(len(tokenize_text(tiny_tokenizer, EXPECTED[4][2]).input_ids))
    stats = length_stats(lengths)
    assert f"min {stats['min']:g}, median {stats['median']:g}, p95 {stats['p95']:g}, max {stats['max']:g}" in out
    too_long = sum(length > 30 for length in lengths)
    assert too_long > 0 and f"too_long: {too_long} skipped" in out
    assert f"no_assistant_turn: 1 skipped, e.g. {path}:6" in out
    # sample 0: only the assistant answer and its end-of-turn token are trained
    rendered = out.split("trained tokens in «»:\n", 1)[1]
    assert rendered.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert rendered.rstrip("\n").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n«4<|eot_id|>»")
    assert rendered.count("«") == 1

    good = _write_jsonl(tmp_path / "good.jsonl", ROWS[:2])
    assert cli_main(["check-data", str(good), "--model", str(tiny_dir), "--sample", "1"]) == 0
    out = capsys.readouterr().out
    rendered = out.split("trained tokens in «»:\n", 1)[1]
    assert "problems: none" in out and rendered.count("«") == 2  # both assistant turns of the ShareGPT sample


def test_content_as_a_list_of_text_parts_is_joined(tmp_path: Path) -> None:
    """The OpenAI / Hugging Face layout: content is a list of {"type": "text", "text": ...} parts."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
            {"prompt": [{"role": "user", "content": [{"text": "Hi"}]}], "completion": "Hello"}]
    examples, report = load_sft_examples(_write_jsonl(tmp_path / "parts.jsonl", rows))
    assert not report
    assert examples[0].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert examples[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    good = {".jsonl": '{"text": "ok"}\n', ".json": "", ".csv": "text\nok\n"}[suffix]
    bad = {".jsonl": '{"text": "caf\xe9"}\n', ".json": '[{"text": "caf\xe9"}]', ".csv": "caf\xe9\n"}[suffix]
    path.write_bytes((good + bad).encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"not UTF-8 text \(byte 0xe9 at byte \d+ cannot be decoded\)") as error:
        load_sft_examples(path)
    assert str(error.value).startswith(f"{path}:2: " if suffix == ".jsonl" else f"{path}: ")
    if suffix == ".jsonl":  # skip mode counts the line and keeps the rest
        examples, report = load_sft_examples(path, on_bad_rows="skip")
        assert len(examples) == 1 and report.counts == {"not_utf8": 1}


def test_column_mapping_reads_other_field_names(tmp_path: Path, tiny_dir, capsys) -> None:
    """Datasets with their own field names are used as they are, through `columns` (config, API and CLI)."""
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}])
    with pytest.raises(DataFormatError, match="no known format"):
        load_sft_examples(path)
    for columns in ({"prompt": "question", "completion": "answer"}, "prompt=question,completion=answer",
                    '{"prompt": "question", "completion": "answer"}'):
        examples, _ = load_sft_examples(path, columns=parse_columns(columns))
        assert examples[0].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        assert examples[0].where == f"{path}:1"  # the location is the file's
    assert cli_main(["check-data", str(path), "--model", str(tiny_dir), "--columns", "prompt=question,completion=answer"]) == 0
    assert "2 valid samples, 0 skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="expected 'our_field=their_column"):
        parse_columns("prompt:question")


def test_plain_text_files_are_text_rows(tmp_path: Path, tiny_dir, capsys) -> None:
    """.txt corpora: one document per file, or one per blank-line-separated block (`txt_split`)."""
    path = tmp_path / "notes.txt"
    path.write_text("First note,\ntwo lines.\n\n\nSecond note.\n  \nThird.\n\n", encoding="utf-8")
    (whole,), _ = load_sft_examples(path)
    assert whole.text == path.read_text() and whole.format == "text" and whole.where == f"{path}:1"
    blocks, _ = load_sft_examples(path, txt_split="blank_lines")
    assert [(b.text, b.line) for b in blocks] == [("First note,\ntwo lines.", 1), ("Second note.", 5), ("Third.", 7)]
    assert cli_main(["check-data", str(path), "--model", str(tiny_dir), "--txt-split", "blank_lines"]) == 0
    assert "3 valid samples, 0 skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="txt_split must be 'file'"):
        load_sft_examples(path, txt_split="paragraph")
