"""Every command turns a user error into one line on stderr and exit status 2; --debug shows the traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.console import DEBUG_ENV

REPO = Path(__file__).resolve().parent.parent


def one_error_line(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"yulan-tune {prog}: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo", "pretrain", "anneal"])
def test_missing_config_file_is_one_line(command, tmp_path, capsys):
    assert cli_main([command, "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in one_error_line(capsys, command)


def test_bad_value_and_missing_model_are_one_line(tmp_path, capsys):
    assert cli_main(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path)]) == 2
    assert "no-model" in one_error_line(capsys, "sft")
    assert cli_main(["sft", "--on_bad_rows", "ignore", "--output_dir", str(tmp_path)]) == 2
    assert "on_bad_rows must be 'raise'" in one_error_line(capsys, "sft")
    assert cli_main(["anneal", "--tokens", "lots", "--output_dir", str(tmp_path)]) == 2
    assert "expected a token count" in one_error_line(capsys, "anneal")
    assert cli_main(["prepare-data", str(tmp_path / "none.jsonl"), "--tokenizer", "x", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "prepare-data")


def test_bad_row_names_file_line_and_field(tiny_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = cli_main(["sft", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--output_dir",
                     str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"])
    assert code == 2
    line = one_error_line(capsys, "sft")
    assert f"{data}:2: field 'messages[1].role': expected one of system/user/assistant/tool, got 'bot'" in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli_main(["--debug", "sft", "--config", str(tmp_path / "nope.yaml")])


def test_recipe_scripts_exit_2_with_one_line(tmp_path):
    """The launchable script (what `accelerate launch recipes/sft.py` runs) behaves as the command."""
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(tmp_path / "x.yaml")],
                            capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [next(line for line in lines if line.startswith("yulan-tune sft: error: "))], lines
