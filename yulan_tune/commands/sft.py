"""`yulan-tune sft --config recipes/configs/X.yaml [--field value ...]` (also `accelerate launch recipes/sft.py`)."""

from __future__ import annotations

import time
from pathlib import Path

from yulan_tune.console import METRICS_FILE, elapsed, summary
from yulan_tune.evaluation.paired import describe_change
from yulan_tune.sft import SFTRecipe, parse_config


def training_kind(config) -> str:
    """full / LoRA / QLoRA (4bit|8bit), as a person names the run."""
    if not config.use_peft:
        return "full fine-tune"
    if config.load_in_4bit or config.load_in_8bit:
        return f"QLoRA ({'4bit' if config.load_in_4bit else '8bit'}) r={config.lora_r}"
    return f"LoRA r={config.lora_r}"


def skipped_line(skipped: dict[str, int]) -> list[str]:
    return [f"rows changed or skipped: {skipped} (details in the log)"] if skipped else []


def math_and_saved_lines(metrics: dict, config, out: Path) -> list[str]:
    """The post-training summary's held-out math line (paired before -> after with McNemar where measured) and where
    the result was saved (DPO and GRPO end alike)."""
    lines = []
    if "math_paired" in metrics:
        paired = metrics["math_paired"]
        lines.append(f"held-out math exact-match {paired['before']:.3f} -> {paired['after']:.3f} on {paired['n']} "
                     f"problems: {describe_change(paired)}")
    elif "math_accuracy_after" in metrics:
        lines.append(f"held-out math exact-match {metrics['math_accuracy_after']:.3f}")
    lines.append(f"saved {'adapter' if config.use_peft else 'model'} to {out}; metrics in {out / METRICS_FILE}")
    return lines


def main(argv: list[str]) -> int:
    started = time.time()
    config = parse_config(argv)
    recipe = SFTRecipe(config)
    metrics = recipe.run()
    out = Path(config.output_dir)
    lines = [f"{training_kind(config)} of {recipe.model_path}: {metrics['steps']} steps on {metrics['train_rows']} "
             f"rows in {elapsed(started)}, train loss {metrics['train_loss']:.4f}", *skipped_line(metrics["skipped"])]
    if "math_accuracy" in metrics:
        lines.append(f"held-out math exact-match {metrics['math_accuracy']:.3f}")
    lines.append(f"saved {'adapter' if config.use_peft else 'model'} to {out}; metrics in {out / METRICS_FILE}")
    summary("sft", lines)
    return 0
