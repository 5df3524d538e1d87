"""`yulan-tune pretrain --config recipes/configs/pretrain_X.yaml [--field value ...]` (also `accelerate launch
recipes/pretrain.py`). `tokenizer: tiny` is resolved here, to the offline tiny YuLan tokenizer."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from yulan_tune.console import METRICS_FILE, elapsed, summary
from yulan_tune.pretrain import PretrainConfig, PretrainRecipe, parse_config
from yulan_tune.tiny import resolve_tiny


def resolve_names(config: PretrainConfig) -> PretrainConfig:
    """The config with `tokenizer: tiny` replaced by the tiny tokenizer's directory (a copy; the given one is kept)."""
    if config.tokenizer is None or resolve_tiny(config.tokenizer, "tokenizer") == config.tokenizer:
        return config
    resolved = copy.copy(config)
    resolved.tokenizer = resolve_tiny(config.tokenizer, "tokenizer")
    return resolved


def main(argv: list[str]) -> int:
    started = time.time()
    config = resolve_names(parse_config(argv))
    result = PretrainRecipe(config).run()
    out = Path(config.output_dir)
    where = f"resumed from {result['resumed_from']}" if result["resumed_from"] else "from the start"
    phases = ", ".join(result["phases_run"]) or "none (the curriculum was already done)"
    lines = [f"phases {phases}: {where}, now at step {result['global_step']} ({elapsed(started)})"]
    loss = result["train_metrics"].get("train_loss")
    if loss is not None:
        lines.append(f"train loss {loss:.4f} (last phase)")
    dropped = sum(result["dropped_rows"].values())
    if dropped:
        lines.append(f"{dropped} rows past the last whole step of their phase were not trained on: "
                     f"{result['dropped_rows']}")
    if "final" in result:
        lines.append(f"saved {result['final']}" + (f" and {result['final_llama']}" if "final_llama" in result else ""))
    lines.append(f"checkpoints in {out}; metrics in {out / METRICS_FILE}")
    summary("pretrain", lines)
    return 0
