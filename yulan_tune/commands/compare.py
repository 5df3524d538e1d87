"""`yulan-tune compare RUN_OR_MODEL ... [--tasks T1,T2]`: several models or earlier runs on the same tasks in one
table, with McNemar's paired test on per-sample metrics and a PNG chart."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from yulan_tune.commands.eval import (
    add_harness_arguments,
    batch_size_value,
    limit_value,
    load_lm,
    plan_from,
    split_list,
)
from yulan_tune.console import METRICS_FILE, elapsed, summary, write_metrics
from yulan_tune.evaluation.compare import format_comparison, paired_tests, write_comparison
from yulan_tune.evaluation.harness import RESULTS_FILE, default_batch_size, read_run, run_tasks, write_run
from yulan_tune.tiny import resolve_tiny


def unique_labels(sources: list[str]) -> list[str]:
    """Short names for the columns: each source's last path part, numbered where two are the same."""
    names = [Path(source.rstrip("/")).name or source for source in sources]
    return [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="yulan-tune compare",
        description="Compare models (evaluated now) or `yulan-tune eval --tasks` output dirs on the same tasks.")
    parser.add_argument("sources", nargs="+", metavar="RUN_OR_MODEL",
                        help="an output dir of `yulan-tune eval --tasks` (has results.json), a model dir, or 'tiny'")
    parser.add_argument("--output", default="outputs/compare", help="directory for the table, chart and new runs")
    add_harness_arguments(parser)
    args = parser.parse_args(argv)
    if len(args.sources) < 2:
        raise ValueError("compare needs at least two runs or models")
    started = time.time()
    out = Path(args.output)
    tasks = split_list(args.tasks)
    limit = limit_value(args.limit)
    batch_size = batch_size_value(args.batch_size) if args.batch_size else default_batch_size()
    labels = unique_labels(args.sources)
    is_run = {source: Path(source, RESULTS_FILE).is_file() for source in args.sources}
    if not all(is_run.values()) and not tasks:
        raise ValueError("--tasks is needed to evaluate a model (only earlier runs can be compared without it)")
    plan = plan_from(args, tasks) if not all(is_run.values()) else None
    runs = {}
    for label, source in zip(labels, args.sources):
        if is_run[source]:
            run = read_run(source)
            missing = [t for t in tasks if t not in run.results.get("results", {})]
            if missing:
                raise ValueError(f"{source} has no results for {', '.join(missing)} (evaluate it with those tasks)")
        else:
            lm = load_lm(resolve_tiny(source, "model"), adapter=None, quantization=args.quantization,
                         batch_size=batch_size)
            run = run_tasks(lm, plan, num_fewshot=args.num_fewshot, limit=limit)
            write_run(out / "runs" / label, run)
            del lm
        runs[label] = run
    paired = paired_tests(runs)
    comparison, chart = write_comparison(out, runs, paired, dict(zip(labels, args.sources)))
    write_metrics(out, {"sources": dict(zip(labels, args.sources)), "tasks": tasks,
                        "metrics": {label: run.metrics() for label, run in runs.items()},
                        "paired": [row.as_dict() for row in paired]})
    print("\n".join(format_comparison(runs, paired)), flush=True)
    summary("compare", [f"{len(runs)} runs on {', '.join(tasks) or 'their tasks'} ({elapsed(started)})",
                        f"table in {comparison}, chart in {chart}, metrics in {out / METRICS_FILE}"])
    return 0
