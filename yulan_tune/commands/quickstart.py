"""`yulan-tune quickstart` (`make quickstart`): build the tiny YuLan, fine-tune it, report held-out accuracy.

Ends with one line: `quickstart: accuracy before=0.xxx after=0.xxx model=outputs/quickstart/model`.
With `--dpo` (`make dpo-quickstart`) on-policy pairs are sampled from the SFT model, and DPO + NLL and LoRA DPO + NLL
on them follow, each with lines of its held-out preference and math accuracy first.
With `--instruct` (`make instruct-quickstart`): SFT -> on-policy pairs -> DPO -> GRPO, one exact-match line per stage.
"""

from __future__ import annotations

import argparse

from yulan_tune.console import summary, write_metrics
from yulan_tune.evaluation.paired import describe_change
from yulan_tune.quickstart import run_instruct_quickstart, run_quickstart


def pairs_line(pairs: dict) -> str:
    return (f"on-policy pairs: {pairs['pairs']} from {pairs['prompts']} prompts x {pairs['samples_per_prompt']} "
            f"samples (sample accuracy {pairs['sample_accuracy']:.3f}); no pair: {pairs['no_pair']}")


def instruct_main(args: argparse.Namespace) -> int:
    out = args.out if args.out != "outputs/quickstart" else "outputs/instruct_quickstart"
    result = run_instruct_quickstart(out, num_problems=args.num_problems, compare_fixed_pairs=args.compare_fixed_pairs,
                                     sft_model=args.sft_model)
    pairs, grpo, n = result.stages["pairs"], result.stages["grpo"], args.num_problems
    lines = [pairs_line(pairs),
             f"grpo: {grpo['steps']} steps, mean reward {grpo['reward_first']:.3f} -> {grpo['reward_last']:.3f}, "
             f"KL coefficient {grpo['final_beta']:.4g}"]
    for stage, accuracy in result.exact_match.items():
        lines.append(f"{stage}: held-out exact-match {accuracy:.3f} on {n} problems")
    for name, paired in result.paired.items():
        lines.append(f"{name}: {paired['before']:.3f} -> {paired['after']:.3f}, {describe_change(paired)}")
    total = sum(result.seconds.values())
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()) + f"; {total:.0f} in all")
    write_metrics(out, {"exact_match": result.exact_match, "paired": result.paired, "seconds": result.seconds,
                        "stages": result.stages})
    summary("instruct-quickstart", lines)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune quickstart", description=__doc__)
    parser.add_argument("--out", default="outputs/quickstart", help="output directory")
    parser.add_argument("--num-problems", type=int, default=None,
                        help="held-out problems to score (default 200; with --instruct 1000)")
    parser.add_argument("--dpo", action="store_true",
                        help="SFT (tiny_full.yaml), on-policy pairs from it, then DPO + NLL (dpo_tiny.yaml) "
                             "and LoRA DPO + NLL (dpo_tiny_lora.yaml) on them")
    parser.add_argument("--instruct", action="store_true",
                        help="SFT -> on-policy DPO -> GRPO (make instruct-quickstart)")
    parser.add_argument("--compare-fixed-pairs", action="store_true",
                        help="with --instruct: also DPO on the bundled fixed pairs from the same SFT model")
    parser.add_argument("--sft-model", default=None, help="with --instruct: start from this SFT model")
    args = parser.parse_args(argv)
    if args.num_problems is None:
        args.num_problems = 1000 if args.instruct else 200
    if args.instruct:
        return instruct_main(args)
    result = run_quickstart(args.out, num_problems=args.num_problems, dpo=args.dpo)
    seconds = result.seconds
    lines = [f"tiny YuLan at {result.tiny_dir} ({seconds['tiny']:.0f} s)",
             f"fine-tuned in {seconds['sft'] - seconds['tiny']:.0f} s, train loss {result.sft['train_loss']:.4f}; "
             f"evaluated {args.num_problems} held-out problems; {seconds['evaluation']:.0f} s in all"]
    stages = list(seconds)  # seconds since the start, in stage order
    if result.pairs:
        took = seconds["pairs"] - seconds["evaluation"]
        lines.append(f"{pairs_line(result.pairs)} ({took:.0f} s)")
    for name, dpo in result.dpo.items():
        took = seconds[name] - seconds[stages[stages.index(name) - 1]]
        paired, before, after = dpo["math_paired"], dpo["heldout_before"], dpo["heldout_after"]
        lines.append(f"{name}: preference accuracy on {dpo['heldout_pairs']} held-out pairs (log p(chosen) > "
                     f"log p(rejected)) before={before['logp_accuracy']:.3f} after={after['logp_accuracy']:.3f}; "
                     f"implicit-reward accuracy after={after['reward_accuracy']:.3f} (0.5 before by construction)")
        lines.append(f"{name}: math accuracy on {paired['n']} held-out problems before={paired['before']:.3f} "
                     f"after={paired['after']:.3f}: {describe_change(paired)} ({took:.0f} s) "
                     f"model={args.out}/{name}")
    lines.append(f"accuracy before={result.accuracy_before:.3f} after={result.accuracy_after:.3f} "
                 f"model={result.model_dir}")
    write_metrics(args.out, {"accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after,
                             "seconds": seconds, "sft": result.sft, "pairs": result.pairs, "dpo": result.dpo})
    summary("quickstart", lines)
    return 0
