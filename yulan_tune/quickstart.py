"""`make quickstart`: build the tiny YuLan, measure held-out math accuracy, fine-tune with SFT, measure again.

With `dpo=True` (`make dpo-quickstart`) the SFT stage trains longer (tiny_full_long.yaml) and DPO follows on its
model (dpo_tiny.yaml), scored on held-out math and preference pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yulan_tune.data.math_problems import generate_problems
from yulan_tune.dpo import DPORecipe
from yulan_tune.dpo import parse_config as parse_dpo_config
from yulan_tune.evaluation.exact_match import math_accuracy
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.paths import RECIPES_DIR
from yulan_tune.sft import SFTRecipe
from yulan_tune.sft import parse_config as parse_sft_config
from yulan_tune.tiny import build_tiny

QUICKSTART_CONFIG = RECIPES_DIR / "configs" / "tiny_full.yaml"
# --dpo trains the SFT stage longer: DPO needs a model that reads the operands (see the config's comment)
DPO_BASE_CONFIG = RECIPES_DIR / "configs" / "tiny_full_long.yaml"
QUICKSTART_DPO_CONFIG = RECIPES_DIR / "configs" / "dpo_tiny.yaml"


@dataclass
class QuickstartResult:
    tiny_dir: Path
    model_dir: Path
    accuracy_before: float
    accuracy_after: float
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds since the start
    sft: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] | None = None
    dpo_dir: Path | None = None


def run_dpo_quickstart(sft_model_dir: str | Path, out_dir: str | Path, *, extra_args: list[str] | None = None
                       ) -> dict[str, Any]:
    """DPO on the quickstart's SFT model with recipes/configs/dpo_tiny.yaml; returns the measured metrics."""
    config = parse_dpo_config(["--config", str(QUICKSTART_DPO_CONFIG), "--model_name_or_path", str(sft_model_dir),
                               "--output_dir", str(out_dir), *(extra_args or [])])
    return DPORecipe(config).run()


def run_quickstart(out: str | Path = "outputs/quickstart", *, num_problems: int = 200, dpo: bool = False
                   ) -> QuickstartResult:
    started = time.time()
    tiny_dir = build_tiny()
    seconds = {"tiny": time.time() - started}
    problems = generate_problems(num_problems, seed=0, split="test")
    before = math_accuracy(load_model(tiny_dir), load_tokenizer(tiny_dir), problems, show_progress=True)
    model_dir = Path(out) / "model"
    config = parse_sft_config(["--config", str(DPO_BASE_CONFIG if dpo else QUICKSTART_CONFIG),
                               "--model_name_or_path", str(tiny_dir), "--output_dir", str(model_dir)])
    recipe = SFTRecipe(config)
    sft_metrics = recipe.run()
    seconds["sft"] = time.time() - started
    after = math_accuracy(recipe.trainer.model, recipe.tokenizer, problems, show_progress=True)
    seconds["evaluation"] = time.time() - started
    result = QuickstartResult(tiny_dir, model_dir, before, after, seconds, sft_metrics)
    if dpo:
        result.dpo_dir = Path(out) / "dpo"
        result.dpo = run_dpo_quickstart(model_dir, result.dpo_dir)
        seconds["dpo"] = time.time() - started
    return result
