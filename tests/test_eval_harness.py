"""`yulan-tune eval --tasks` / `compare` on lm-evaluation-harness, offline on the tiny YuLan.

No accuracy of the tiny model is asserted (it is retrained from time to time): every check is an equality between two
ways of computing the same thing (lm-eval vs plain torch, lm-eval vs `math_correct`, yulanmini vs its Llama export,
an unmerged adapter vs its merge) or a property of the output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from yulan_tune.cli import main as cli_main
from yulan_tune.console import DEBUG_ENV
from yulan_tune.data.math_problems import KINDS, extract_answer, generate_problems, math_messages
from yulan_tune.evaluation.exact_match import generate_answers, math_correct
from yulan_tune.evaluation.harness import (
    MATH_TASK,
    SUITE,
    defined_in,
    evaluate_model,
    leaf_tasks,
    read_run,
    task_manager,
)
from yulan_tune.evaluation.tasks.yulan_math.utils import DATA_FILE, math_rows

MC_TASK = "yulan_test_mc"
MC_ITEMS = 60


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def one_error_line(capsys, prog: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"yulan-tune {prog}: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def mc_task_dir(tmp_path_factory) -> Path:
    """A local multiple-choice task: JSONL (60 items) + its own YAML, for --include-path."""
    root = tmp_path_factory.mktemp("mc_task")
    rng = random.Random(7)
    rows = []
    for problem in generate_problems(MC_ITEMS, seed=3, split="test"):
        wrong = rng.sample([n for n in range(0, 40) if n != problem.answer], 3)
        choices = [str(n) for n in [problem.answer, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"Question: {problem.question}\nAnswer:", "choices": choices,
                     "label": choices.index(str(problem.answer))})
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "mc.yaml").write_text(f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return root


def mc_rows(task_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]


@torch.no_grad()
def independent_loglikelihoods(model, tokenizer, rows: list[dict]) -> list[list[float]]:
    """log p(" " + choice | question) for each choice, with plain torch: context tokens as the tokenizer encodes the
    question (BOS included), continuation = the tokens that encoding question + " " + choice adds."""
    model.eval()
    out = []
    for row in rows:
        context = tokenizer(row["question"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["question"] + " " + choice)["input_ids"]
            assert whole[: len(context)] == context
            logits = model(torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        out.append(scores)
    return out


def harness_loglikelihoods(run, task: str = MC_TASK) -> list[list[float]]:
    records = sorted(run.samples[task], key=lambda r: r["doc_id"])
    return [[float(resp[0]) for resp in record["filtered_resps"]] for record in records]


def test_math_task_data_is_the_generated_problems():
    shipped = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert shipped == math_rows()
    assert [row["question"] for row in shipped] == [p.question for p in generate_problems(200, 0, split="test")]


def test_math_task_predictions_equal_math_accuracy(tiny_dir, tiny_tokenizer):
    """Through lm-eval (chat template, greedy, end-of-turn stop, the same answer extraction) every one of the first 12
    held-out problems (every kind, the first four already; each generated three times at batch size 1: 40 problems
    took 60 s on 2 cores) gets the same completion, prediction and score as `math_correct`. Batch size 1 on both
    sides: the same token sequences, so any difference is the path's, not padding's."""
    from yulan_tune.loading import load_model

    model = load_model(tiny_dir)
    problems = generate_problems(12, 0, split="test")
    assert {p.operation for p in problems} == set(KINDS)
    run = evaluate_model(model, tiny_tokenizer, [MATH_TASK], batch_size=1, limit=len(problems))
    records = sorted(run.samples[MATH_TASK], key=lambda r: r["doc_id"])
    assert len(records) == len(problems)
    expected_texts = generate_answers(model, tiny_tokenizer, [math_messages(p) for p in problems], batch_size=1)
    correct = math_correct(model, tiny_tokenizer, problems, batch_size=1)
    assert [r["filtered_resps"][0] for r in records] == expected_texts
    assert [extract_answer(r["filtered_resps"][0]) for r in records] == [extract_answer(t) for t in expected_texts]
    assert [r["exact_match"] == 1.0 for r in records] == correct
    assert run.results["results"][MATH_TASK]["exact_match,none"] == pytest.approx(sum(correct) / len(correct))


def test_multiple_choice_choice_equals_independent_argmax(tiny_dir, tiny_tokenizer, mc_task_dir, tmp_path, capsys):
    """`yulan-tune eval --tasks` on a local task: lm-eval's choice per item is the argmax of log-likelihoods computed
    here with plain torch; results.json, per-sample records and metrics are written."""
    from yulan_tune.loading import load_model

    out = tmp_path / "eval"
    code = cli_main(["eval", "--model", str(tiny_dir), "--tasks", MC_TASK, "--include-path", str(mc_task_dir),
                     "--batch-size", "4", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert MC_TASK in printed and "acc" in printed and "results in" in printed
    assert (out / "results.json").is_file() and (out / "samples" / f"{MC_TASK}.jsonl").is_file()
    metrics = json.loads((out / "yulan_tune_metrics.json").read_text())
    run = read_run(out)
    rows = mc_rows(mc_task_dir)
    harness = harness_loglikelihoods(run)
    independent = independent_loglikelihoods(load_model(tiny_dir), tiny_tokenizer, rows)
    assert len(harness) == len(rows) == MC_ITEMS
    chosen = [max(range(len(s)), key=s.__getitem__) for s in harness]
    assert chosen == [max(range(len(s)), key=s.__getitem__) for s in independent]
    for got, want in zip(harness, independent):
        assert got == pytest.approx(want, abs=1e-4)
    records = sorted(run.samples[MC_TASK], key=lambda r: r["doc_id"])
    assert [r["acc"] for r in records] == [float(c == row["label"]) for c, row in zip(chosen, rows)]
    assert metrics["metrics"][f"{MC_TASK}/acc"] == pytest.approx(sum(c == row["label"] for c, row in zip(chosen, rows))
                                                                / MC_ITEMS)


def test_yulanmini_checkpoint_equals_its_llama_export(tiny_dir, tiny_tokenizer, mc_task_dir):
    """The yulanmini form (loaded natively) and its `to_llama` export: per-item log-likelihoods within 1e-4."""
    from yulan_tune.loading import load_model, load_tokenizer

    yulanmini_dir = tiny_dir / "yulanmini"
    yulanmini = load_model(yulanmini_dir, dtype=torch.float32)
    assert type(yulanmini).__name__.startswith("YuLanMini")
    llama = load_model(tiny_dir, dtype=torch.float32)
    options = dict(include_path=str(mc_task_dir), batch_size=4)
    a = harness_loglikelihoods(evaluate_model(yulanmini, load_tokenizer(yulanmini_dir), [MC_TASK], **options))
    b = harness_loglikelihoods(evaluate_model(llama, tiny_tokenizer, [MC_TASK], **options))
    assert len(a) == len(b) == MC_ITEMS
    assert max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)) < 1e-4


@pytest.fixture(scope="module")
def lora_adapter(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA adapter with non-zero B (so it changes the model) and its fp32 merge."""
    from peft import LoraConfig, get_peft_model

    from yulan_tune.export import merge_adapter
    from yulan_tune.loading import load_model

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(root / "adapter"))
    merged = merge_adapter(root / "adapter", root / "merged", base=str(tiny_dir), dtype=torch.float32)
    return root / "adapter", merged


def test_lora_unmerged_equals_merged(tiny_dir, tiny_tokenizer, mc_task_dir, lora_adapter):
    from yulan_tune.loading import load_model

    adapter, merged = lora_adapter
    options = dict(include_path=str(mc_task_dir), batch_size=4)
    unmerged_model = load_model(tiny_dir, adapter=adapter, dtype=torch.float32)
    assert type(unmerged_model).__name__.startswith("PeftModel")  # unmerged: LoRA layers in the forward
    unmerged = harness_loglikelihoods(evaluate_model(unmerged_model, tiny_tokenizer, [MC_TASK], **options))
    merged_lls = harness_loglikelihoods(evaluate_model(load_model(merged, dtype=torch.float32), tiny_tokenizer,
                                                       [MC_TASK], **options))
    base = harness_loglikelihoods(evaluate_model(load_model(tiny_dir, dtype=torch.float32), tiny_tokenizer,
                                                 [MC_TASK], **options))
    assert max(abs(x - y) for xs, ys in zip(unmerged, merged_lls) for x, y in zip(xs, ys)) < 1e-4
    assert max(abs(x - y) for xs, ys in zip(unmerged, base) for x, y in zip(xs, ys)) > 1e-3  # the adapter acts


def test_compare_two_models_table_paired_test_and_chart(tiny_dir, mc_task_dir, lora_adapter, tmp_path, capsys):
    _, merged = lora_adapter
    out = tmp_path / "compare"
    code = cli_main(["compare", str(tiny_dir), str(merged), "--tasks", MC_TASK, "--include-path", str(mc_task_dir),
                     "--batch-size", "4", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "McNemar p=" in printed and f"on {MC_ITEMS} paired samples" in printed
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "comparison.json").read_text())
    assert set(document["runs"]) == {tiny_dir.name, merged.name}
    (paired,) = document["paired"]
    assert paired["n"] == MC_ITEMS and paired["metric"] == "acc"
    before = read_run(out / "runs" / tiny_dir.name).per_sample(MC_TASK, "acc")
    after = read_run(out / "runs" / merged.name).per_sample(MC_TASK, "acc")
    assert paired["newly_right"] == sum(before[i] == 0 and after[i] == 1 for i in before)
    assert paired["newly_wrong"] == sum(before[i] == 1 and after[i] == 0 for i in before)
    # an earlier run directory compares too, without evaluating again
    code = cli_main(["compare", str(out / "runs" / tiny_dir.name), str(out / "runs" / merged.name),
                     "--output", str(tmp_path / "again")])
    assert code == 0
    again = json.loads((tmp_path / "again" / "comparison.json").read_text())
    assert again["paired"] == document["paired"]


def test_suite_group_resolves_offline_to_the_report_benchmarks():
    """`yulan_mini` resolves through lm-eval's TaskManager index to lm-eval's own tasks; nothing is downloaded."""
    manager = task_manager()
    entry = manager.task_index[SUITE]
    children = [item["task"] for item in entry.cfg["task"]]
    assert children == ["gsm8k", "minerva_math500", "humaneval", "mbpp", "mmlu", "ceval-valid", "cmmlu", "arc_easy",
                        "arc_challenge", "hellaswag", "winogrande", "storycloze_2016", "lambada_openai", "race"]
    leaves = leaf_tasks(manager, SUITE)
    assert set(children) - {"mmlu", "ceval-valid", "cmmlu"} <= set(leaves)
    assert sum(name.startswith("mmlu_") for name in leaves) == 57
    assert sum(name.startswith("ceval-valid_") for name in leaves) == 52
    assert sum(name.startswith("cmmlu_") for name in leaves) == 67
    assert all(name in manager.all_tasks for name in leaves)


def test_our_and_included_tasks_resolve_without_indexing_lm_evals_own(tmp_path):
    """`task_manager(for_tasks=...)` indexes only our and the included directories when every name is defined there;
    the full index (lm-eval's own tasks, shared with the suite test above) otherwise, and resolves the same tasks."""
    full = task_manager()
    local = task_manager(for_tasks=[MATH_TASK])
    assert local is not full and "gsm8k" not in local.task_index and "gsm8k" in full.task_index
    assert leaf_tasks(local, MATH_TASK) == leaf_tasks(full, MATH_TASK) == [MATH_TASK]
    assert local.task_index[MATH_TASK].yaml_path == full.task_index[MATH_TASK].yaml_path
    for names in (["gsm8k"], [MATH_TASK, "gsm8k"], [SUITE], ["gsm8kk"]):
        assert task_manager(for_tasks=names) is full, names

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = "task: {name}\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
    (tasks / "a.yaml").write_text(task.format(name="mine_a") + "tag: mine_tag\n")
    (tasks / "b.yaml").write_text(task.format(name="mine_b"))
    (tasks / "group.yaml").write_text("group: mine_group\ntask:\n  - mine_a\n  - task: mine_b\n")
    (tasks / "mixed.yaml").write_text("group: mine_mixed\ntask:\n  - mine_a\n  - gsm8k\n")
    (tasks / "nested.yaml").write_text("group: mine_nested\ntask:\n  - mine_group\n  - mine_tag\n")
    included = task_manager(tasks, for_tasks=["mine_a", "mine_group", MATH_TASK])
    assert "gsm8k" not in included.task_index
    assert leaf_tasks(included, "mine_group") == ["mine_a", "mine_b"]
    # a group with one of lm-eval's tasks, a tag (it gathers tasks from every directory), a group holding a tag
    assert [defined_in(included, name) for name in ("mine_mixed", "mine_tag", "mine_nested", "nope")] == \
           [False, False, False, False]
    # a long-lived process indexing many include paths keeps the full index (15 s to rebuild)
    for i in range(9):
        (tmp_path / f"more{i}").mkdir()
        task_manager(tmp_path / f"more{i}", for_tasks=[MATH_TASK])
    assert task_manager() is full


def test_user_errors_are_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = ["eval", "--model", str(tiny_dir), "--output", str(tmp_path / "out")]
    assert cli_main([*base, "--tasks", "gsm8kk"]) == 2
    assert "unknown task 'gsm8kk'; did you mean gsm8k?" in one_error_line(capsys, "eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("""task: remote_not_cached
dataset_path: yulan-tune-tests/not-in-any-cache
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""")
    assert cli_main([*base, "--tasks", "remote_not_cached", "--include-path", str(tasks)]) == 2
    line = one_error_line(capsys, "eval")
    assert "'yulan-tune-tests/not-in-any-cache'" in line and "datasets.load_dataset(" in line
    assert cli_main([*base, "--tasks", "humaneval"]) == 2
    assert "--allow-code-execution" in one_error_line(capsys, "eval")
    assert cli_main([*base, "--tasks", MATH_TASK, "--include-path", str(tmp_path / "nope")]) == 2
    assert "nope" in one_error_line(capsys, "eval")
    assert cli_main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", MATH_TASK]) == 2
    assert "no-model" in one_error_line(capsys, "eval")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert cli_main([*base, "--tasks", MATH_TASK, "--backend", "vllm"]) == 2
        assert "vLLM" in one_error_line(capsys, "eval")


def test_eval_during_training_leaves_the_losses_bitwise_equal(tiny_dir, tmp_path):
    """SFT (LoRA, dropout on: the run draws from the RNG every step) with `eval_tasks` every 2 steps logs the task's
    metric with the trainer's and into the output dir, and its training losses equal a run without it, bit for bit."""
    from yulan_tune.evaluation.during_training import EVAL_LOG
    from yulan_tune.sft import SFTRecipe, parse_config

    def run(out: Path, *extra: str) -> SFTRecipe:
        recipe = SFTRecipe(parse_config(
            ["--config", str(Path(__file__).resolve().parent.parent / "recipes" / "configs" / "tiny_lora.yaml"),
             "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--num_bundled_examples", "200",
             "--max_steps", "4", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm",
             "true", "--report_to", "none", "--seed", "3", *extra]))
        recipe.run()
        return recipe

    plain = run(tmp_path / "plain")
    evaluated = run(tmp_path / "evaluated", "--eval_tasks", MATH_TASK, "--eval_every_steps", "2", "--eval_limit", "4")
    losses = [[e["loss"] for e in r.trainer.state.log_history if "loss" in e] for r in (plain, evaluated)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    key = f"harness/{MATH_TASK}/exact_match"
    assert [e["step"] for e in evaluated.trainer.state.log_history if key in e] == [2, 4]
    lines = [json.loads(line) for line in (tmp_path / "evaluated" / EVAL_LOG).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4] and all(0.0 <= line[key] <= 1.0 for line in lines)
    assert not (tmp_path / "plain" / EVAL_LOG).exists()
