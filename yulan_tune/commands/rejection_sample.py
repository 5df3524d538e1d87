"""`yulan-tune rejection-sample [--sft-model DIR]`: one rejection-sampling round on the bundled math problems: sample
several solutions per training problem from an SFT model (default: the quickstart's), keep the verified ones,
fine-tune on them, and compare held-out exact-match before and after (McNemar's exact test)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from yulan_tune.console import METRICS_FILE, elapsed, summary, write_metrics
from yulan_tune.evaluation.paired import describe_change
from yulan_tune.rejection_sampling import ROUND_SFT_CONFIG, RejectionSamplingConfig, run_rejection_sampling
from yulan_tune.sft import parse_config as parse_sft_config


def main(argv: list[str]) -> int:
    defaults = RejectionSamplingConfig()
    parser = argparse.ArgumentParser(prog="yulan-tune rejection-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-model", default=None,
                        help="the SFT model to sample from (a dir or 'tiny'); default: train the quickstart's")
    parser.add_argument("--out", default=defaults.out_dir, help="output dir (reused by a rerun: stages resume)")
    parser.add_argument("--train-problems", type=int, default=defaults.train_problems,
                        help="bundled train-split problems to sample on")
    parser.add_argument("--samples-per-problem", type=int, default=defaults.samples_per_problem)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--eval-problems", type=int, default=defaults.eval_problems,
                        help="held-out problems scored before and after")
    parser.add_argument("--config", default=str(ROUND_SFT_CONFIG), help="SFT config of the fine-tune")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences sampled together")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args, sft_overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    # the rest are `--field value` overrides of the fine-tune's SFT config: checked now, not after an hour of sampling
    parse_sft_config(["--config", args.config, "--model_name_or_path", "tiny", "--output_dir", args.out,
                      *sft_overrides])
    started = time.time()
    config = RejectionSamplingConfig(
        out_dir=args.out, sft_model=args.sft_model, train_problems=args.train_problems,
        samples_per_problem=args.samples_per_problem, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, eval_problems=args.eval_problems, sft_config=args.config,
        sft_overrides=sft_overrides, batch_size=args.batch_size, seed=args.seed)
    result = run_rejection_sampling(config)
    write_metrics(args.out, {**result.as_dict(), "config": vars(config)})
    summary("rejection-sample", [
        f"sampled {result.samples} solutions of {args.train_problems} train problems from {result.sft_model}: "
        f"{result.accepted} verified, {result.rejected} rejected; {result.train_rows} distinct verified solutions "
        f"({result.problems_with_a_verified_sample} problems) fine-tuned on",
        f"held-out exact-match on {result.eval_problems} problems before={result.before:.3f} after={result.after:.3f}: "
        f"{describe_change(result.as_dict())}",
        f"model in {result.model_dir}, metrics in {Path(args.out) / METRICS_FILE} ({elapsed(started)})",
    ])
    return 0
