"""`make quickstart`: build the tiny YuLan, measure held-out math accuracy, fine-tune with SFT, measure again.

Ends with one line: `quickstart: accuracy before=0.xxx after=0.xxx model=outputs/quickstart/model`.
With `--dpo` (`make dpo-quickstart`) the SFT stage trains longer (tiny_full_long.yaml) and DPO follows on its model
(dpo_tiny.yaml), with a line of the DPO stage's held-out math and preference accuracy before the last line.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from yulan_tune.paths import RECIPES_DIR

QUICKSTART_CONFIG = RECIPES_DIR / "configs" / "tiny_full.yaml"
# --dpo trains the SFT stage longer: DPO needs a model that reads the operands (see the config's comment)
DPO_BASE_CONFIG = RECIPES_DIR / "configs" / "tiny_full_long.yaml"


def quickstart_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune quickstart", description=__doc__)
    parser.add_argument("--out", default="outputs/quickstart", help="output directory")
    parser.add_argument("--num-problems", type=int, default=200, help="held-out problems to score")
    parser.add_argument("--dpo", action="store_true",
                        help="SFT with tiny_full_long.yaml (200-233 s measured), then DPO with dpo_tiny.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from yulan_tune.data.math_problems import generate_problems
    from yulan_tune.eval import math_accuracy
    from yulan_tune.loading import load_model, load_tokenizer
    from yulan_tune.modeling.tiny import build_tiny
    from yulan_tune.sft import SFTRecipe, parse_config

    started = time.time()
    tiny_dir = build_tiny()
    print(f"quickstart: tiny YuLan at {tiny_dir} ({time.time() - started:.0f}s)", flush=True)
    problems = generate_problems(args.num_problems, seed=0, split="test")
    before = math_accuracy(load_model(tiny_dir), load_tokenizer(tiny_dir), problems)
    print(f"quickstart: base accuracy {before:.3f}; fine-tuning ({time.time() - started:.0f}s)", flush=True)

    model_dir = Path(args.out) / "model"
    sft_config = DPO_BASE_CONFIG if args.dpo else QUICKSTART_CONFIG
    config = parse_config(["--config", str(sft_config), "--model_name_or_path", str(tiny_dir),
                           "--output_dir", str(model_dir), "--disable_tqdm", "true"])
    recipe = SFTRecipe(config)
    recipe.run()
    after = math_accuracy(recipe.trainer.model, recipe.tokenizer, problems)
    print(f"quickstart: fine-tuned in {time.time() - started:.0f}s", flush=True)
    if args.dpo:
        from yulan_tune.dpo import run_dpo_quickstart

        dpo_dir = Path(args.out) / "dpo"
        dpo_metrics = run_dpo_quickstart(model_dir, dpo_dir)
        print(f"quickstart: dpo {dpo_metrics}", flush=True)
        preference = (dpo_metrics["heldout_before"]["reward_accuracy"], dpo_metrics["heldout_after"]["reward_accuracy"])
        print(f"quickstart: dpo math accuracy before={dpo_metrics['math_accuracy_before']:.3f} "
              f"after={dpo_metrics['math_accuracy_after']:.3f}, held-out preference accuracy "
              f"before={preference[0]:.3f} after={preference[1]:.3f} model={dpo_dir}")
    print(f"quickstart: accuracy before={before:.3f} after={after:.3f} model={model_dir}")
    return 0
