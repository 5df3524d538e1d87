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
        dpo = result.dpo
        lines.append(f"dpo math accuracy before={dpo['math_accuracy_before']:.3f} "
                     f"after={dpo['math_accuracy_after']:.3f}, held-out preference accuracy "
                     f"before={dpo['heldout_before']['reward_accuracy']:.3f} "
                     f"after={dpo['heldout_after']['reward_accuracy']:.3f} model={result.dpo_dir}")
    lines.append(f"accuracy before={result.accuracy_before:.3f} after={result.accuracy_after:.3f} "
                 f"model={result.model_dir}")
    write_metrics(args.out, {"accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
                             "seconds": seconds, "sft": result.sft, "dpo": result.dpo})
    summary("quickstart", lines)
    return 0
