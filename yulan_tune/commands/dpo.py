"""`yulan-tune dpo --config recipes/configs/dpo_X.yaml [--field value ...]` (also `accelerate launch recipes/dpo.py`)."""

from __future__ import annotations

import time
from pathlib import Path

from yulan_tune.commands.sft import math_and_saved_lines, skipped_line, training_kind
from yulan_tune.console import elapsed, summary
from yulan_tune.dpo import DPORecipe, parse_config


def main(argv: list[str]) -> int:
    started = time.time()
    config = parse_config(argv)
    recipe = DPORecipe(config)
    metrics = recipe.run()
    out = Path(config.output_dir)
    lines = [f"{recipe.method} ({'+'.join(config.loss_type)}, {training_kind(config)}) of {recipe.model_path}: "
             f"{metrics['train_rows']} rows in {elapsed(started)}, train loss {metrics['train_loss']:.4f}",
             *skipped_line(metrics["skipped"])]
    if "heldout_after" in metrics:
        before, after = metrics["heldout_before"], metrics["heldout_after"]
        lines.append(f"held-out pairs ({metrics['heldout_pairs']}): reward accuracy {before['reward_accuracy']:.3f} -> "
                     f"{after['reward_accuracy']:.3f}, log-prob accuracy {before['logp_accuracy']:.3f} -> "
                     f"{after['logp_accuracy']:.3f}")
    lines += math_and_saved_lines(metrics, config, out)
    summary("dpo", lines)
    return 0
