"""The rejection-sampling round: its pieces on the tiny model (fast), and a whole small round (slow)."""

from __future__ import annotations

import json

import pytest

from yulan_tune.rejection_sampling import (
    TRAIN_FILE,
    RejectionSamplingConfig,
    _distinct_verified,
    run_rejection_sampling,
)


def test_distinct_verified_counts_each_solution_once(tmp_path):
    same = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is 2."}]
    other = [{"role": "user", "content": "r"}, {"role": "assistant", "content": "The answer is 3."}]
    accepted = tmp_path / "accepted.jsonl"
    accepted.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "train-0#0", "messages": same}, {"id": "train-0#2", "messages": same},
        {"id": "train-1#1", "messages": other}]))
    assert _distinct_verified(accepted, tmp_path / TRAIN_FILE) == (2, 2)
    assert [json.loads(line) for line in (tmp_path / TRAIN_FILE).read_text().splitlines()] == [
        {"messages": same}, {"messages": other}]


def test_config_rejects_greedy_sampling():
    with pytest.raises(ValueError, match="temperature must be positive"):
        RejectionSamplingConfig(temperature=0)


def test_a_model_with_no_verified_sample_stops_with_one_line(tiny_dir, tmp_path):
    # the tiny base has never seen the chat format: none of its samples ends in the right answer
    config = RejectionSamplingConfig(out_dir=str(tmp_path), sft_model=str(tiny_dir), train_problems=3,
                                     samples_per_problem=2, eval_problems=4, max_new_tokens=8)
    with pytest.raises(ValueError, match="no sample of .* was verified correct"):
        run_rejection_sampling(config, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(not row["accepted"] and row["reason"] for row in rows)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a short SFT first, then sampling and the round: about a minute on 2 busy cores
def test_a_small_round_end_to_end_and_rerun_reuses_its_stages(tmp_path, tiny_dir):
    from yulan_tune.paths import RECIPES_DIR
    from yulan_tune.sft import SFTRecipe, parse_config

    # A model that gets some of the round's problems right: SFT on exactly those 48 train problems for 10 epochs
    # (~30 s on 2 cores); 6 of its 192 samples, on 6 problems, were verified. Learning the task in general
    # takes minutes here (the quickstart's SFT): 700 other conversations in 55 s gave 2 of 192.
    sft_dir = tmp_path / "sft"
    SFTRecipe(parse_config([
        "--config", str(RECIPES_DIR / "configs" / "tiny_full.yaml"), "--model_name_or_path", str(tiny_dir),
        "--output_dir", str(sft_dir), "--num_bundled_examples", "48", "--num_train_epochs", "10",
        "--disable_tqdm", "true"])).run()
    config = RejectionSamplingConfig(out_dir=str(tmp_path / "round"), sft_model=str(sft_dir), train_problems=48,
                                     samples_per_problem=4, eval_problems=40, sft_overrides=["--max_steps", "5"])
    result = run_rejection_sampling(config, show_progress=False)
    assert result.samples == 48 * 4 == result.accepted + result.rejected and result.accepted > 0
    assert 0 < result.train_rows <= result.accepted and result.problems_with_a_verified_sample <= 48
    assert result.sft["steps"] == 5 and 0 <= result.mcnemar_p <= 1 and result.eval_problems == 40
    again = run_rejection_sampling(config, show_progress=False)
    assert (again.before, again.after, again.train_rows) == (result.before, result.after, result.train_rows)
    assert "fine_tune" in again.seconds


def test_command_checks_its_fine_tune_overrides_before_it_starts(tmp_path, capsys):
    from yulan_tune.cli import main as cli_main

    assert cli_main(["rejection-sample", "--out", str(tmp_path / "out"), "--no_such_field", "1"]) == 2
    assert "--no_such_field" in capsys.readouterr().err and not (tmp_path / "out" / "sft").exists()
