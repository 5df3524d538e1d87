"""`yulan-tune quickstart` (`make quickstart`): build the tiny YuLan, fine-tune it, report held-out accuracy.

Ends with one line: `quickstart: accuracy before=0.xxx after=0.xxx model=outputs/quickstart/model`.
With `--dpo` (`make dpo-quickstart`) DPO follows, with a line of its held-out math and preference accuracy first.
"""

from __future__ import annotations

import argparse

from yulan_tune.console import summary, write_metrics
from yulan_tune.quickstart import run_quickstart


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune quickstart", description=__doc__)
    parser.add_argument("--out", default="outputs/quickstart", help="output directory")
    parser.add_argument("--num-problems", type=int, default=200, help="held-out problems to score")
    parser.add_argument("--dpo", action="store_true",
                        help="SFT with tiny_full_long.yaml (1209 updates), then DPO with dpo_tiny.yaml")
    args = parser.parse_args(argv)
    result = run_quickstart(args.out, num_problems=args.num_problems, dpo=args.dpo)
    seconds = result.seconds
    lines = [f"tiny YuLan at {result.tiny_dir} ({seconds['tiny']:.0f} s)",
             f"fine-tuned in {seconds['sft'] - seconds['tiny']:.0f} s, train loss {result.sft['train_loss']:.4f}; "
             f"evaluated {args.num_problems} held-out problems; {seconds['evaluation']:.0f} s in all"]
    if result.dpo is not None:
        dpo, paired = result.dpo, result.dpo["math_paired"]
        before, after = dpo["heldout_before"], dpo["heldout_after"]
        lines.append(f"dpo preference accuracy on {dpo['heldout_pairs']} held-out pairs (log p(chosen) > log p(rejected)) "
                     f"before={before['logp_accuracy']:.3f} after={after['logp_accuracy']:.3f}; implicit-reward "
                     f"accuracy after={after['reward_accuracy']:.3f} (0.5 before by construction)")
        lines.append(f"dpo math accuracy on {paired['n']} held-out problems before={paired['before']:.3f} "
                     f"after={paired['after']:.3f}: newly right {paired['newly_right']}, newly wrong "
                     f"{paired['newly_wrong']}, McNemar p={paired['mcnemar_p']:.3g} model={result.dpo_dir}")
    lines.append(f"accuracy before={result.accuracy_before:.3f} after={result.accuracy_after:.3f} "
                 f"model={result.model_dir}")
    write_metrics(args.out, {"accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
                             "seconds": seconds, "sft": result.sft, "dpo": result.dpo})
    summary("quickstart", lines)
    return 0
