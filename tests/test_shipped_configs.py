"""Every shipped tiny config runs end to end through the command a user types (a few steps each): the SFT configs on
the tiny YuLan, every DPO-family config on it as the SFT model, pretraining twice into two output directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.paths import PRETRAIN_DIR, RECIPES_DIR

CONFIGS = RECIPES_DIR / "configs"


def metrics(out: Path) -> dict:
    return json.loads((out / "yulan_tune_metrics.json").read_text())


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("tiny_*.yaml")))
def test_sft_config_runs(config, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["sft", "--config", str(CONFIGS / config), "--model_name_or_path", str(tiny_dir), "--output_dir",
                     str(out), "--num_bundled_examples", "32", "--max_steps", "2", "--disable_tqdm", "true"]) == 0
    assert metrics(out)["steps"] == 2


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("dpo_tiny*.yaml")))
def test_dpo_family_config_runs(config, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["dpo", "--config", str(CONFIGS / config), "--model_name_or_path", str(tiny_dir), "--output_dir",
                     str(out), "--num_bundled_pairs", "16", "--num_heldout_pairs", "8", "--max_steps", "2",
                     "--eval_math_problems", "0", "--disable_tqdm", "true"]) == 0
    result = metrics(out)
    assert result["heldout_pairs"] == 8 and 0 <= result["heldout_after"]["reward_accuracy"] <= 1


def test_pretrain_config_runs_twice_into_two_output_directories(tmp_path, yulan_home):
    """`tokenizer: tiny` resolves to one cached tokenizer, and the packed data (data_root) is keyed by the tokenizer's
    content, so a second run with another output_dir reuses it instead of failing. The shipped curriculum's phases
    are cut to 8K tokens (3 whole steps of 8 rows): the shipped 96K-token first phase is 46 steps, 80 s per run on 2
    cores."""
    shipped = (PRETRAIN_DIR / "curriculum" / "tiny.yaml").read_text()
    assert shipped.count("total_tokens: 96K") == 1 and shipped.count("total_tokens: 64K") == 1
    curriculum = tmp_path / "tiny_short.yaml"
    curriculum.write_text(shipped.replace("total_tokens: 96K", "total_tokens: 8K")
                          .replace("total_tokens: 64K", "total_tokens: 8K"))
    for out in ("first", "second"):
        assert cli_main(["pretrain", "--config", str(CONFIGS / "pretrain_tiny.yaml"),
                         "--output_dir", str(tmp_path / out), "--curriculum", str(curriculum),
                         "--data_root", str(tmp_path / "data"),
                         "--stop_after_phase", "code", "--per_device_train_batch_size", "8", "--warmup_steps", "1",
                         "--decay_steps", "2", "--eval_strategy", "no", "--eval_on_start", "false",
                         "--save_steps", "1000", "--report_to", "none", "--disable_tqdm", "true"]) == 0
        result = metrics(tmp_path / out)
        assert result["phases_run"] == ["code"] and result["global_step"] == 3  # 31 rows: 3 steps of 8, 7 left over
