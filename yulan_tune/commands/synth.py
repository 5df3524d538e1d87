"""`yulan-tune synth --task math|code|rewrite --backend transformers|openai|vllm --model M --in SEEDS --out DIR`:
several samples per seed from a model or an OpenAI-compatible server, each checked by a verifier; accepted samples
as SFT conversations, rejected ones with the reason, resumable after a kill."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from yulan_tune.console import METRICS_FILE, elapsed, summary, write_metrics
from yulan_tune.generation.backends import BACKENDS, make_backend
from yulan_tune.generation.synthesis import ACCEPTED_FILE, REJECTED_FILE, SAMPLES_FILE, SynthesisConfig, Synthesizer
from yulan_tune.generation.templates import TASKS, shipped_templates
from yulan_tune.tiny import resolve_tiny
from yulan_tune.verifiers.code import network_isolation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yulan-tune synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--backend", choices=BACKENDS, default="transformers")
    parser.add_argument("--model", required=True,
                        help="transformers / vllm: a model dir, hub id or 'tiny'; openai: the server's model name")
    parser.add_argument("--in", dest="seeds", required=True,
                        help="seed rows (JSONL, JSON, CSV, Parquet, a dir of them): the template's fields, or "
                             "'messages'; optional 'id', 'answer' (math), 'tests' (code, required)")
    parser.add_argument("--out", required=True, help="output dir (samples.jsonl, accepted.jsonl, rejected.jsonl)")
    parser.add_argument("--template", default=None,
                        help=f"a shipped template ({', '.join(shipped_templates())}) or a template file; "
                             "default: the task's")
    parser.add_argument("--n", type=int, default=4, help="samples per seed")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="the first N seeds only")
    parser.add_argument("--chunk-size", type=int, default=16, help="seeds generated and saved together")
    parser.add_argument("--min-vote-share", type=float, default=0.5,
                        help="math without a reference answer: the majority answer must hold this share of samples")
    parser.add_argument("--on-bad-rows", choices=("raise", "skip"), default="raise")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="--task code: run generated programs against the seed tests (subprocess, limits, no "
                             "network)")
    parser.add_argument("--code-timeout", type=float, default=5.0, help="seconds per program run (wall clock)")
    parser.add_argument("--code-memory-mb", type=int, default=512, help="address-space limit per program run")
    server = parser.add_argument_group("--backend openai (vLLM, SGLang, llama.cpp server, ...)")
    server.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1 (key: $OPENAI_API_KEY)")
    server.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    server.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    server.add_argument("--retries", type=int, default=3, help="further attempts on errors, timeouts, 429 / 5xx")
    local = parser.add_argument_group("--backend transformers")
    local.add_argument("--adapter", default=None, help="a LoRA adapter dir on top of --model")
    local.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    local.add_argument("--quantization", choices=("4bit", "8bit"), default=None)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    config = SynthesisConfig(
        task=args.task, template=args.template, n=args.n, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, chunk_size=args.chunk_size,
        min_vote_share=args.min_vote_share, allow_code_execution=args.allow_code_execution,
        code_timeout_s=args.code_timeout, code_memory_mb=args.code_memory_mb, on_bad_rows=args.on_bad_rows,
        max_seeds=args.limit)
    if not Path(args.seeds).exists():
        raise FileNotFoundError(f"--in {args.seeds}: no such file or directory")
    identity = {"backend": args.backend, "model": args.model, "adapter": args.adapter}
    if args.backend == "openai":
        backend = make_backend("openai", args.model, base_url=args.base_url, concurrency=args.concurrency,
                               timeout_s=args.timeout, retries=args.retries)
    elif args.backend == "transformers":
        backend = make_backend("transformers", resolve_tiny(args.model, "model"), adapter=args.adapter,
                               batch_size=args.batch_size, quantization=args.quantization)
    else:
        backend = make_backend("vllm", resolve_tiny(args.model, "model"))
    result = Synthesizer(config, backend, backend_identity=identity).run(args.seeds, args.out)
    out = Path(args.out)
    metrics = {**result.as_dict(), "config": vars(args) | {"seeds": args.seeds}, "backend": identity}
    if args.task == "code":
        metrics["network_isolation"] = network_isolation()
    write_metrics(out, metrics)
    reasons = ", ".join(f"{reason} {count}" for reason, count in result.reasons.items())
    resumed = f"; {result.done_before} seeds were already done (resumed)" if result.done_before else ""
    skipped = f"; {result.skipped.total_skipped} bad seed rows skipped" if result.skipped.total_skipped else ""
    summary("synth", [
        f"{result.seeds} seeds x {config.n} samples: {result.accepted} accepted, {result.rejected} rejected "
        f"({reasons}) in {elapsed(started)}{resumed}{skipped}",
        f"accepted conversations in {out / ACCEPTED_FILE}, rejected with reasons in {out / REJECTED_FILE}, every "
        f"sample in {out / SAMPLES_FILE}, metrics in {out / METRICS_FILE}",
    ])
    return 0
