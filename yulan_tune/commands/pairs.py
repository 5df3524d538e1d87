"""`yulan-tune pairs --model SFT_DIR --prompts FILE --samples K --out DIR`: on-policy preference pairs.

Samples K answers per prompt from the model, labels them (math answer, code tests with --allow-code-execution, else
--reward-model) and writes DIR/pairs.jsonl for `yulan-tune dpo --dataset DIR/pairs.jsonl`; counts the prompts that
gave no pair by reason. A killed run resumes from DIR/samples.jsonl.
"""

from __future__ import annotations

import argparse
import time

from yulan_tune.console import METRICS_FILE, elapsed, summary
from yulan_tune.pairs import PairsConfig, PairsRecipe


def main(argv: list[str]) -> int:
    defaults = PairsConfig()
    parser = argparse.ArgumentParser(prog="yulan-tune pairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="SFT model dir / hub id / 'tiny' (openai: its name)")
    parser.add_argument("--prompts", default=defaults.prompts,
                        help="prompt rows (prompt|messages|question, answer, tests) or 'bundled:math_chat'")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="answers sampled per prompt")
    parser.add_argument("--out", default=defaults.out, help="output directory")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--backend", default=defaults.backend, choices=("transformers", "vllm", "openai"))
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible server (backend openai)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter on --model (transformers backend)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--reward-model", default=None, help="labels prompts without answer / tests")
    parser.add_argument("--check-arithmetic", action="store_true",
                        help="math: a right final answer counts as right only when every equation it writes is true")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run sampled programs against the rows' tests (limited subprocess, no network)")
    parser.add_argument("--pairs-per-prompt", type=int, default=defaults.pairs_per_prompt)
    parser.add_argument("--num-bundled-prompts", type=int, default=defaults.num_bundled_prompts)
    parser.add_argument("--on-bad-rows", default=defaults.on_bad_rows, choices=("raise", "skip"))
    args = parser.parse_args(argv)
    started = time.time()
    config = PairsConfig(model=args.model, prompts=args.prompts, out=args.out, samples=args.samples,
                         temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, backend=args.backend, base_url=args.base_url, adapter=args.adapter,
                         batch_size=args.batch_size, reward_model=args.reward_model,
                         check_arithmetic=args.check_arithmetic,
                         allow_code_execution=args.allow_code_execution, pairs_per_prompt=args.pairs_per_prompt,
                         num_bundled_prompts=args.num_bundled_prompts, on_bad_rows=args.on_bad_rows)
    metrics = PairsRecipe(config).run()
    accuracy = metrics["sample_accuracy"]
    lines = [f"{metrics['prompts']} prompts x {config.samples} samples from {config.model} in {elapsed(started)}"
             + (f" ({metrics['resumed_prompts']} prompts from an earlier run)" if metrics["resumed_prompts"] else ""),
             f"labelled by {metrics['labelled_by']}" + (f"; verified sample accuracy {accuracy:.3f}"
                                                         if accuracy is not None else ""),
             f"{metrics['pairs']} pairs from {metrics['prompts_with_pair']} prompts; no pair: {metrics['no_pair']}",
             f"pairs in {metrics['pairs_file']} (yulan-tune dpo --dataset {metrics['pairs_file']}); metrics in "
             f"{config.out}/{METRICS_FILE}"]
    if metrics["right_answer_false_equation"]:
        lines.insert(2, f"{metrics['right_answer_false_equation']} samples with the right answer and a false equation "
                        "counted as wrong (--check-arithmetic)")
    if metrics["skipped_rows"]:
        lines.insert(1, f"rows skipped: {metrics['skipped_rows']}")
    summary("pairs", lines)
    return 0
