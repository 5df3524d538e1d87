"""`yulan-tune anneal --config recipes/configs/anneal_X.yaml [--field value ...]` (also `accelerate launch
recipes/anneal.py`)."""

from __future__ import annotations

import time
from pathlib import Path

from yulan_tune.anneal import AnnealRecipe, parse_config
from yulan_tune.console import METRICS_FILE, elapsed, summary


def main(argv: list[str]) -> int:
    started = time.time()
    config = parse_config(argv)
    recipe = AnnealRecipe(config)
    metrics = recipe.run()
    out = Path(config.output_dir)
    lines = [f"{config.decay} decay of {recipe.source.model_dir} from step {metrics['start_step']} to "
             f"{metrics['end_step']} ({elapsed(started)}), train loss {metrics['train_loss']:.4f}"]
    state = metrics.get("optimizer_state")
    if recipe.optimizer_checkpoint is not None:
        lines.append(f"checkpoint: {recipe.checkpoint_line(recipe.optimizer_checkpoint)}")
    lines.append(f"optimizer state: {state['loaded']} parameters' moments loaded ({state['format']})"
                 + (f", {state['masters_loaded']} fp32 masters" if state.get("masters_loaded") else "") if state
                 else "optimizer state: fresh AdamW moments (optimizer_state: none)")
    lines.append(f"saved to {out}" + (f", Llama export in {config.export_dir}" if config.export_dir else "")
                 + f"; plan in {out / 'anneal_plan.json'}, metrics in {out / METRICS_FILE}")
    summary("anneal", lines)
    return 0
