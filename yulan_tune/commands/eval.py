"""`yulan-tune eval`: a model on lm-evaluation-harness tasks (`--tasks`), in-process with our loader; without
`--tasks`, the held-out math exact-match accuracy (the quickstart's metric, unchanged)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from yulan_tune.console import METRICS_FILE, elapsed, summary, write_metrics
from yulan_tune.data.math_problems import generate_problems
from yulan_tune.evaluation.exact_match import math_accuracy
from yulan_tune.evaluation.harness import (
    RESULTS_FILE,
    SAMPLES_DIR,
    YuLanLM,
    default_batch_size,
    format_table,
    plan_tasks,
    require_vllm,
    run_tasks,
    vllm_lm,
    write_run,
)
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.tiny import resolve_tiny


def split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def batch_size_value(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--batch-size must be 'auto' or a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"--batch-size must be 'auto' or a positive integer, got {text!r}")
    return value


def limit_value(text: str | None) -> int | float | None:
    """--limit N (documents per task) or a fraction in (0, 1)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--limit must be a number of documents or a fraction, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"--limit must be positive, got {text!r}")
    return value if value < 1 else int(value)


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `eval --tasks` and `compare` share."""
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-eval task / group names (e.g. yulan_math, yulan_mini, gsm8k, mmlu)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="shots for every task (default: each task's)")
    parser.add_argument("--limit", default=None, help="at most N documents per task (or a fraction < 1)")
    parser.add_argument("--batch-size", default=None, help="'auto' or N (default: auto on GPU, 8 on CPU)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a directory of your own lm-eval task YAMLs (repeatable)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="allow tasks that execute model-generated code (humaneval, mbpp)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render every task with the model's chat template (yulan_math always is)")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="load the model quantized")


def plan_from(args: argparse.Namespace, tasks: list[str]):
    """The tasks checked and built (names, permission, data in the offline cache) before any model is loaded."""
    return plan_tasks(tasks, include_path=args.include_path, allow_code_execution=args.allow_code_execution,
                      apply_chat_template=args.apply_chat_template)


def load_lm(model: str, *, adapter: str | None, quantization: str | None, batch_size: int | str,
            backend: str = "hf"):
    """lm-eval's model for `model` (+ adapter) loaded by our loader (hf), or by vLLM."""
    if backend == "vllm":
        tokenizer_path = adapter if adapter and Path(adapter, "tokenizer_config.json").exists() else model
        return vllm_lm(model, tokenizer_path=tokenizer_path, adapter=adapter, quantization=quantization,
                       batch_size=batch_size)
    tokenizer = load_tokenizer(adapter if adapter and Path(adapter, "tokenizer_config.json").exists() else model)
    loaded = load_model(model, adapter=adapter, quantization=quantization)
    return YuLanLM(loaded, tokenizer, batch_size=batch_size)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="yulan-tune eval",
        description="Evaluate a model: lm-evaluation-harness tasks with --tasks, else held-out math exact-match.")
    parser.add_argument("--model", required=True, help="model dir, hub id, or 'tiny'")
    parser.add_argument("--adapter", default=None, help="optional LoRA adapter dir (evaluated unmerged)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="hf (our loader) or vllm (GPU)")
    parser.add_argument("--output", default=None,
                        help="directory for results.json, per-sample records and metrics (default: outputs/eval/NAME)")
    add_harness_arguments(parser)
    math_group = parser.add_argument_group("without --tasks: held-out math exact-match")
    math_group.add_argument("--num-problems", type=int, default=200)
    math_group.add_argument("--seed", type=int, default=0)
    math_group.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    started = time.time()
    model_path = resolve_tiny(args.model, "model")
    if not args.tasks:
        tokenizer = load_tokenizer(args.adapter or model_path)
        model = load_model(model_path, adapter=args.adapter, quantization=args.quantization)
        problems = generate_problems(args.num_problems, args.seed, split="test")
        accuracy = math_accuracy(model, tokenizer, problems, max_new_tokens=args.max_new_tokens, show_progress=True)
        if args.output:
            write_metrics(args.output, {"model": args.model, "math_accuracy": accuracy, "n": len(problems)})
        summary("eval", [f"math exact-match={accuracy:.3f} n={len(problems)} model={args.model} ({elapsed(started)})"])
        return 0

    tasks = split_list(args.tasks)
    limit = limit_value(args.limit)
    if args.backend == "vllm":
        require_vllm()
    batch_size = batch_size_value(args.batch_size) if args.batch_size else default_batch_size()
    plan = plan_from(args, tasks)
    lm = load_lm(model_path, adapter=args.adapter, quantization=args.quantization, batch_size=batch_size,
                 backend=args.backend)
    run = run_tasks(lm, plan, num_fewshot=args.num_fewshot, limit=limit)
    out = Path(args.output or Path("outputs") / "eval" / Path(str(args.model).rstrip("/")).name)
    write_run(out, run)
    metrics = run.metrics()
    write_metrics(out, {"model": args.model, "adapter": args.adapter, "tasks": tasks, "backend": args.backend,
                        "metrics": metrics, "seconds": round(time.time() - started, 1)})
    print("\n".join(format_table(run.rows())), flush=True)
    summary("eval", [f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {', '.join(tasks)} "
                     f"({args.backend}, {elapsed(started)})",
                     f"results in {out / RESULTS_FILE}, per-sample records in {out / SAMPLES_DIR}, "
                     f"metrics in {out / METRICS_FILE}"])
    return 0
