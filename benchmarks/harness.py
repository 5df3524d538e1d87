"""The comparison harness: the command line every benchmark script shares, and the interleaved runner that runs each
variant in fresh worker processes (`--worker`) so that their numbers can be turned into ratios (`reporting`).

How a comparison is measured (the issue's rule: ratios from one run, never one-off absolute times):
- every training run happens in a fresh subprocess (so its peak memory is its own), and the variants alternate
  A B, B A, A B, ... so that slow drifts of a shared machine hit both alike;
- inside a run the first `warmup_steps` optimizer steps are not timed; tokens are counted from the very batches
  the trainer consumed (the data collator's output), so each variant is credited with exactly what it trained;
- a comparison reports the median over repetitions of each variant's numbers and the median of the per-repetition
  ratios (candidate / baseline of the same repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import REPO_ROOT


def benchmark_arguments(description: str, *, reps: int, steps: int) -> argparse.ArgumentParser:
    """The arguments every comparison takes: the hidden worker protocol (`run_worker`), device, repetitions, steps,
    seed, per-run timeout and where results go. Each script adds its own on the returned parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=reps, help="repetitions of each variant, interleaved")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--json", help="write all runs and the summary to this file")
    parser.add_argument("--write-results", action="store_true", help="append a row to benchmarks/RESULTS.md")
    return parser


# ------------------------------------------------------------------------------------------- interleaved fresh runs


def run_worker(module: str, variant: str, settings: dict[str, Any], timeout: float, workdir: Path) -> dict[str, Any]:
    """Run `python -m module --worker variant --settings file --out file` in a fresh process; return its result."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings_file = workdir / f"settings-{variant}.json"
    settings_file.write_text(json.dumps(settings))
    out_file = Path(tempfile.mkstemp(prefix=f"{variant}-", suffix=".json", dir=workdir)[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    command = [sys.executable, "-m", module, "--worker", variant, "--settings", str(settings_file),
               "--out", str(out_file)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out_file.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def interleaved_order(variants: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """A B, B A, A B, ...: each repetition runs every variant once, alternating which goes first."""
    order = []
    for rep in range(reps):
        for variant in (variants if rep % 2 == 0 else list(reversed(variants))):
            order.append((rep, variant))
    return order


def run_interleaved(module: str, variants: Sequence[str], reps: int, settings: dict[str, Any], *, timeout: float,
                    workdir: Path, log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep, variant in interleaved_order(variants, reps):
        result = run_worker(module, variant, settings, timeout, workdir)
        result["rep"] = rep
        results[variant].append(result)
        log(f"  rep {rep} {variant:>12}: {result['trained_tokens_per_s']:9.1f} trained tok/s, "
            f"wall {result['wall_s']:6.2f} s over {result['steps_measured']} steps, "
            f"peak {memory_label(result)} (process {result['process_s']:.0f} s)")
    return results


def memory_label(result: dict[str, Any]) -> str:
    if "peak_gpu_mib" in result:
        return f"{result['peak_gpu_mib'] / 1024:.2f} GiB GPU"
    return f"{result['peak_rss_mib']:.0f} MiB RSS"
