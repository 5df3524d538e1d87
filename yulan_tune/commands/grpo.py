"""`yulan-tune grpo --config recipes/configs/grpo_X.yaml [--field value ...]` (also `accelerate launch recipes/grpo.py`)."""

from __future__ import annotations

import time
from pathlib import Path

from yulan_tune.commands.sft import math_and_saved_lines, skipped_line, training_kind
from yulan_tune.console import elapsed, summary
from yulan_tune.grpo import GRPORecipe, parse_config


def main(argv: list[str]) -> int:
    started = time.time()
    config = parse_config(argv)
    recipe = GRPORecipe(config)
    metrics = recipe.run()
    out = Path(config.output_dir)
    resumed = f" (resumed from {metrics['resumed_from']})" if metrics["resumed_from"] else ""
    lines = [f"grpo ({training_kind(config)}) of {recipe.model_path}: {metrics['steps']} steps on "
             f"{metrics['prompts']} prompts x {config.num_generations} samples in {elapsed(started)}{resumed}",
             f"rewards {'+'.join(metrics['rewards'])}: mean reward {metrics['reward_first']:.3f} (first log) -> "
             f"{metrics['reward_last']:.3f} (last log); KL coefficient {metrics['final_beta']:.4g}"
             if metrics["reward_first"] is not None else f"rewards {'+'.join(metrics['rewards'])}",
             *skipped_line(metrics["skipped"])]
    lines += math_and_saved_lines(metrics, config, out)
    summary("grpo", lines)
    return 0
