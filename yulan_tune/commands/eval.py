"""`yulan-tune eval`: held-out math exact-match accuracy of a model (optionally with a LoRA adapter)."""

from __future__ import annotations

import argparse
import time

from yulan_tune.console import elapsed, summary
from yulan_tune.data.math_problems import generate_problems
from yulan_tune.evaluation.exact_match import math_accuracy
from yulan_tune.loading import load_model, load_tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune eval", description="Held-out math exact-match accuracy.")
    parser.add_argument("--model", required=True, help="model dir or hub id")
    parser.add_argument("--adapter", default=None, help="optional LoRA adapter dir")
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    started = time.time()
    tokenizer = load_tokenizer(args.adapter or args.model)
    model = load_model(args.model, adapter=args.adapter)
    problems = generate_problems(args.num_problems, args.seed, split="test")
    accuracy = math_accuracy(model, tokenizer, problems, max_new_tokens=args.max_new_tokens, show_progress=True)
    summary("eval", [f"math exact-match={accuracy:.3f} n={len(problems)} model={args.model} ({elapsed(started)})"])
    return 0
