"""On-policy preference pairs: how pairs are chosen from labelled samples, the whole recipe on the tiny YuLan (math
verifier, reward model, prompts with nothing to label them), that `yulan-tune dpo` reads its output, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.data.preferences import PreferenceExample, load_preference_examples
from yulan_tune.pairs import PAIRS_FILE, SAMPLES_FILE, Labelled, PairsConfig, PairsRecipe, choose_pairs


def test_choose_pairs_from_verified_and_scored_samples() -> None:
    texts = ["a", "b", "c", "d"]
    assert choose_pairs(Labelled(texts, [True, False, True, False], None, "math"), 1) == ([("a", "b")], None)
    assert choose_pairs(Labelled(texts, [True, False, True, False], None, "math"), 5)[0] == [("a", "b"), ("c", "d")]
    assert choose_pairs(Labelled(texts, [True] * 4, None, "math"), 1) == ([], "all_correct")
    assert choose_pairs(Labelled(texts, [False] * 4, None, "math"), 1) == ([], "all_wrong")
    # the same wrong text sampled twice is one rejected answer, not two
    assert choose_pairs(Labelled(["a", "b", "b", "c"], [True, False, False, True], None, "math"), 3)[0] == [("a", "b")]
    assert choose_pairs(Labelled(texts, None, [0.1, 2.0, -1.0, 0.5], "reward_model"), 2)[0] == [("b", "c"),
                                                                                                ("d", "a")]
    assert choose_pairs(Labelled(texts, None, [1.0] * 4, "reward_model"), 1) == ([], "tied_scores")
    assert choose_pairs(Labelled(texts, None, None, "none"), 1) == ([], "no_label")


def _prompts_file(path: Path) -> Path:
    rows = [{"prompt": "Ava has 3 apples and gets 4 more. How many apples does Ava have now?", "answer": 7},
            {"messages": [{"role": "user", "content": "Ben has 9 pens and gives away 2. How many are left?"},
                          {"role": "assistant", "content": "9 - 2 = 7. The answer is 7."}], "answer": "7"},
            {"question": "Write a short poem about the sea."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _reward_model(tiny_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_dir, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def test_pairs_on_the_tiny_model_label_count_and_feed_dpo(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs"
    assert cli_main(["pairs", "--model", str(tiny_dir), "--prompts", str(prompts), "--samples", "6", "--out",
                     str(out), "--max-new-tokens", "12", "--temperature", "1.5"]) == 0
    metrics = json.loads((out / "yulan_tune_metrics.json").read_text())
    assert metrics["prompts"] == 3
    assert metrics["labelled_by"] == {"math": 2, "none": 1}
    assert metrics["no_pair"].get("no_label") == 1  # the poem has no answer and no reward model was given
    assert metrics["prompts_with_pair"] + sum(metrics["no_pair"].values()) == 3
    samples = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [len(s["samples"]) for s in samples] == [6, 6, 6]
    # the final assistant turn of a `messages` row is what the model answers, not part of the prompt
    assert samples[1]["prompt"][-1]["role"] == "user"

    # with a reward model the poem gets scores, and its best and worst answers become a pair
    reward_out = tmp_path / "pairs_rm"
    PairsRecipe(PairsConfig(model=str(tiny_dir), prompts=str(prompts), out=str(reward_out), samples=4,
                            max_new_tokens=12, temperature=1.5,
                            reward_model=str(_reward_model(tiny_dir, tmp_path / "rm")))).run()
    rm_metrics = json.loads((reward_out / "yulan_tune_metrics.json").read_text())
    assert rm_metrics["labelled_by"] == {"math": 2, "reward_model": 1}
    rows = [json.loads(line) for line in (reward_out / PAIRS_FILE).read_text().splitlines()]
    poem = [r for r in rows if r["labelled_by"] == "reward_model"]
    assert len(poem) == 1 and poem[0]["chosen"] != poem[0]["rejected"]
    examples, report = load_preference_examples(str(reward_out / PAIRS_FILE))
    assert len(examples) == rm_metrics["pairs"] and all(isinstance(e, PreferenceExample) for e in examples)
    assert not report.total_skipped


def test_a_killed_run_resumes_to_the_same_pairs(tiny_dir: Path, tmp_path: Path) -> None:
    def run(out: Path) -> dict:
        return PairsRecipe(PairsConfig(model=str(tiny_dir), prompts="bundled:math_chat", num_bundled_prompts=6,
                                       out=str(out), samples=3, max_new_tokens=10, temperature=1.5,
                                       chunk_prompts=2)).run()

    full = run(tmp_path / "full")
    assert full["prompts"] == 6
    # a run killed while writing its second chunk: two complete lines and a torn third
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = (tmp_path / "full" / SAMPLES_FILE).read_text().splitlines(keepends=True)
    (killed / SAMPLES_FILE).write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    resumed = run(killed)
    assert resumed["resumed_prompts"] == 2
    assert (killed / PAIRS_FILE).read_text() == (tmp_path / "full" / PAIRS_FILE).read_text()
    assert len((killed / SAMPLES_FILE).read_text().splitlines()) == 6


def test_check_arithmetic_relabels_stored_samples(tiny_dir: Path, tmp_path: Path) -> None:
    """A right final answer reached through a false equation is a rejected answer with `check_arithmetic`; the
    stored samples are relabelled without sampling again (every prompt is already in samples.jsonl)."""
    from yulan_tune.data.math_problems import generate_problems

    (problem,) = generate_problems(1, seed=0, split="train")
    right = problem.solution
    first_step = right.split(". ")[0]  # "a op b = c"
    false_step = first_step.rsplit("= ", 1)[0] + f"= {int(first_step.rsplit('= ', 1)[1]) + 1}"
    right_by_luck = right.replace(first_step, false_step, 1)
    wrong = f"The answer is {problem.answer + 3}."
    out = tmp_path / "pairs"
    out.mkdir()
    row = {"index": 0, "prompt": [{"role": "user", "content": problem.question}], "how": "math",
           "samples": [right_by_luck, right, wrong], "correct": [True, True, False], "scores": None}
    (out / SAMPLES_FILE).write_text(json.dumps(row) + "\n")

    def pairs(check: bool) -> tuple[dict, list[tuple[str, str]]]:
        metrics = PairsRecipe(PairsConfig(model=str(tiny_dir), num_bundled_prompts=1, out=str(out),
                                          samples=3, pairs_per_prompt=2, check_arithmetic=check)).run()
        rows = [json.loads(line) for line in (out / PAIRS_FILE).read_text().splitlines()]
        return metrics, [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]

    metrics, plain = pairs(False)
    assert plain == [(right_by_luck, wrong)] and metrics["right_answer_false_equation"] is None
    metrics, checked = pairs(True)
    assert checked == [(right, right_by_luck)] and metrics["right_answer_false_equation"] == 1
    assert metrics["resumed_prompts"] == 1 and metrics["sample_accuracy"] == 2 / 3  # the verifier's own labels


def test_bad_input_is_one_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine", "answer": 1}) + "\n" + json.dumps({"answer": 3}) + "\n")
    assert cli_main(["pairs", "--model", str(tiny_dir), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in error and "'prompt'" in error and len(error.splitlines()) == 1
    with pytest.raises(ValueError, match="samples must be at least 2"):
        PairsConfig(samples=1)
