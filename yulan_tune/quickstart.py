"""`make quickstart`: build the tiny YuLan, measure held-out math accuracy, fine-tune with SFT, measure again.

With `dpo=True` (`make dpo-quickstart`) on-policy preference pairs are sampled from the SFT model and labelled by the
math verifier (`ON_POLICY_PAIRS`, `yulan-tune pairs`), and DPO + NLL (dpo_tiny.yaml) and LoRA DPO + NLL
(dpo_tiny_lora.yaml) train on them, each scored on held-out math and preference pairs against the SFT model.

`run_instruct_quickstart` (`make instruct-quickstart`) is YuLan-Mini-Instruct's recipe in small: SFT
(tiny_full.yaml) -> on-policy preference pairs sampled from the SFT model and labelled by the math verifier
(`yulan-tune pairs`) -> DPO on them (dpo_tiny.yaml) -> GRPO with verifiable rewards (grpo_tiny.yaml), each stage's
held-out exact-match measured on the same problems; optionally DPO on the bundled fixed pairs from the same SFT
model as the baseline the on-policy pairs are compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yulan_tune.data.math_problems import generate_problems, solutions
from yulan_tune.dpo import DPORecipe
from yulan_tune.dpo import parse_config as parse_dpo_config
from yulan_tune.evaluation.exact_match import math_accuracy, math_correct
from yulan_tune.evaluation.paired import compare_paired
from yulan_tune.grpo import GRPORecipe
from yulan_tune.grpo import parse_config as parse_grpo_config
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.pairs import PairsConfig, PairsRecipe
from yulan_tune.paths import RECIPES_DIR
from yulan_tune.sft import SFTRecipe
from yulan_tune.sft import parse_config as parse_sft_config
from yulan_tune.tiny import build_tiny
from yulan_tune.training.post_training import native_bf16_overrides

QUICKSTART_CONFIG = RECIPES_DIR / "configs" / "tiny_full.yaml"
QUICKSTART_DPO_CONFIG = RECIPES_DIR / "configs" / "dpo_tiny.yaml"
# the DPO runs of `make dpo-quickstart`: output subdirectory -> config
QUICKSTART_DPO_RUNS = {"dpo": QUICKSTART_DPO_CONFIG, "dpo_lora": RECIPES_DIR / "configs" / "dpo_tiny_lora.yaml"}
QUICKSTART_GRPO_CONFIG = RECIPES_DIR / "configs" / "grpo_tiny.yaml"
# the on-policy pairs of both DPO quickstarts: 4 samples per prompt as YuLan's PPO, at its sampling temperature 1.0.
# 4000 prompts, not 1500: from the quickstart's SFT model, 1118 pairs of 1500 prompts moved validation exact-match
# +0.019 with one data order and -0.001 with another; 3182 pairs of 4000 prompts +0.044 and +0.036 (docs/tiny_model.md)
ON_POLICY_PAIRS = PairsConfig(prompts="bundled:math_chat", samples=4, temperature=1.0, max_new_tokens=48,
                              num_bundled_prompts=4000, pairs_per_prompt=2, seed=0)


@dataclass
class QuickstartResult:
    tiny_dir: Path
    model_dir: Path
    accuracy_before: float
    accuracy_after: float
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds since the start
    sft: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] = field(default_factory=dict)  # the on-policy pairs' metrics (with dpo)
    dpo: dict[str, dict[str, Any]] = field(default_factory=dict)  # output directory -> that DPO run's metrics


def run_dpo_quickstart(sft_model_dir: str | Path, out_dir: str | Path, *,
                       config_file: str | Path = QUICKSTART_DPO_CONFIG, extra_args: list[str] | None = None
                       ) -> dict[str, Any]:
    """DPO on the quickstart's SFT model with `config_file` (dpo_tiny.yaml); returns the measured metrics."""
    config = parse_dpo_config(["--config", str(config_file), "--model_name_or_path", str(sft_model_dir),
                               "--output_dir", str(out_dir), *(extra_args or [])])
    return DPORecipe(config).run()


def sample_on_policy_pairs(sft_model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """`ON_POLICY_PAIRS` from the SFT model into `out_dir`; returns the pairs recipe's metrics (`pairs_file`,
    counts)."""
    return PairsRecipe(replace(ON_POLICY_PAIRS, model=str(sft_model_dir), out=str(out_dir))).run()


def quickstart_sft(tiny_dir: str | Path, output_dir: str | Path) -> SFTRecipe:
    """The quickstart's SFT recipe (tiny_full.yaml) on `tiny_dir`, in bf16 autocast where the CPU computes bf16
    natively (~1.5x faster there)."""
    return SFTRecipe(parse_sft_config(["--config", str(QUICKSTART_CONFIG), "--model_name_or_path", str(tiny_dir),
                                       "--output_dir", str(output_dir), *native_bf16_overrides()]))


def run_quickstart(out: str | Path = "outputs/quickstart", *, num_problems: int = 200, dpo: bool = False
                   ) -> QuickstartResult:
    started = time.time()
    tiny_dir = build_tiny()
    seconds = {"tiny": time.time() - started}
    problems = generate_problems(num_problems, seed=0, split="test")
    before = math_accuracy(load_model(tiny_dir), load_tokenizer(tiny_dir), problems, show_progress=True)
    model_dir = Path(out) / "model"
    recipe = quickstart_sft(tiny_dir, model_dir)
    sft_metrics = recipe.run()
    seconds["sft"] = time.time() - started
    after = math_accuracy(recipe.trainer.model, recipe.tokenizer, problems, show_progress=True)
    seconds["evaluation"] = time.time() - started
    result = QuickstartResult(tiny_dir, model_dir, before, after, seconds, sft_metrics)
    if dpo:
        result.pairs = sample_on_policy_pairs(model_dir, Path(out) / "pairs")
        seconds["pairs"] = time.time() - started
        for name, config_file in QUICKSTART_DPO_RUNS.items():
            result.dpo[name] = run_dpo_quickstart(model_dir, Path(out) / name, config_file=config_file,
                                                  extra_args=["--dataset", result.pairs["pairs_file"]])
            seconds[name] = time.time() - started
    return result


@dataclass
class InstructQuickstartResult:
    out: Path
    exact_match: dict[str, float]  # stage -> held-out exact-match
    paired: dict[str, dict[str, Any]]  # "a -> b" -> McNemar comparison on the same problems
    seconds: dict[str, float]  # stage -> seconds the stage took
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its recipe's metrics


def run_instruct_quickstart(out: str | Path = "outputs/instruct_quickstart", *, num_problems: int = 1000,
                            compare_fixed_pairs: bool = False, sft_model: str | Path | None = None
                            ) -> InstructQuickstartResult:
    """SFT -> on-policy pairs -> DPO -> GRPO on the tiny YuLan; every model scored on the same `num_problems`
    held-out problems (greedy, exact final answer), each step's change tested with McNemar's exact test and its
    clustered form (problems with the same worked solution form one cluster; evaluation.paired).
    `sft_model`: start from this SFT model instead of training one."""
    out = Path(out)
    problems = generate_problems(num_problems, seed=0, split="test")
    seconds: dict[str, float] = {}
    stages: dict[str, dict[str, Any]] = {}
    correct: dict[str, list[bool]] = {}

    def stage(name: str, started: float) -> None:
        seconds[name] = round(time.time() - started, 1)

    started = time.time()
    if sft_model is None:
        tiny_dir = build_tiny()
        stage("tiny", started)
        started = time.time()
        sft_dir = out / "sft"
        recipe = quickstart_sft(tiny_dir, sft_dir)
        stages["sft"] = recipe.run()
        model, tokenizer = recipe.trainer.model, recipe.tokenizer
        stage("sft", started)
    else:
        sft_dir = Path(sft_model)
        model, tokenizer = load_model(sft_dir), load_tokenizer(sft_dir)
    started = time.time()
    correct["sft"] = math_correct(model, tokenizer, problems, show_progress=True)
    stage("sft_eval", started)

    started = time.time()
    stages["pairs"] = sample_on_policy_pairs(sft_dir, out / "pairs")
    stage("pairs", started)

    def dpo(name: str, extra: list[str]) -> None:
        began = time.time()
        config = parse_dpo_config(["--config", str(QUICKSTART_DPO_CONFIG), "--model_name_or_path", str(sft_dir),
                                   "--output_dir", str(out / name), "--eval_math_problems", "0", *extra])
        dpo_recipe = DPORecipe(config)
        stages[name] = dpo_recipe.run()
        correct[name] = math_correct(dpo_recipe.trainer.model, dpo_recipe.tokenizer, problems, show_progress=True)
        stage(name, began)

    dpo("dpo_on_policy", ["--dataset", stages["pairs"]["pairs_file"]])
    if compare_fixed_pairs:
        dpo("dpo_fixed_pairs", [])

    started = time.time()
    config = parse_grpo_config(["--config", str(QUICKSTART_GRPO_CONFIG), "--model_name_or_path",
                                str(out / "dpo_on_policy"), "--output_dir", str(out / "grpo"),
                                "--eval_math_problems", "0"])
    grpo_recipe = GRPORecipe(config)
    stages["grpo"] = grpo_recipe.run()
    correct["grpo"] = math_correct(grpo_recipe.trainer.model, grpo_recipe.tokenizer, problems, show_progress=True)
    stage("grpo", started)

    comparisons = [("sft", "dpo_on_policy"), ("dpo_on_policy", "grpo"), ("sft", "grpo")]
    if compare_fixed_pairs:
        comparisons += [("sft", "dpo_fixed_pairs"), ("dpo_fixed_pairs", "dpo_on_policy")]
    paired = {f"{a} -> {b}": compare_paired(correct[a], correct[b], clusters=solutions(problems)).as_dict()
              for a, b in comparisons}
    exact_match = {name: sum(c) / len(c) for name, c in correct.items()}
    return InstructQuickstartResult(out, exact_match, paired, seconds, stages)
