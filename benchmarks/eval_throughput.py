"""Evaluation throughput: `yulan-tune eval --tasks T` against the plain `lm_eval run --model hf` command on the same
model, task, limit and batch size.

    python -m benchmarks.eval_throughput                       # tiny YuLan, the bundled yulan_math task, 200 items
    python -m benchmarks.eval_throughput --model DIR --tasks gsm8k --limit 100 --device cuda

Both variants are whole commands a user types, each in a fresh process, alternating (A B, B A, ...): the time is
the process's wall clock from start to exit (imports, model load, the evaluation, writing results and per-sample
records), so whatever either side does once per run is counted. The baseline is lm-eval as a knowledgeable user runs
it on this task: the same batch size (lm-eval's default is 1), `--apply_chat_template` (yulan_math is a chat task;
`yulan-tune eval` renders it with the chat template), the model's stored dtype, `--log_samples` (ours writes
per-sample records too). Both must score the same exact-match, else the comparison is void and the script says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import REPO_ROOT  # noqa: E402
from benchmarks.harness import benchmark_arguments, interleaved_order  # noqa: E402
from benchmarks.reporting import append_results, environment, fmt, median, save_json, versions_label  # noqa: E402

CANDIDATE, BASELINE = "yulan-tune", "lm_eval"
TASKS_DIR = REPO_ROOT / "yulan_tune" / "evaluation" / "tasks"


def command(variant: str, model: str, args: Any, out_dir: Path) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if variant == CANDIDATE:
        return [str(bin_dir / "yulan-tune"), "eval", "--model", model, "--tasks", args.tasks, "--limit", str(args.limit),
                "--batch-size", str(args.batch_size), "--output", str(out_dir)]
    return [str(bin_dir / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=auto",
            "--tasks", args.tasks, "--include_path", str(TASKS_DIR), "--apply_chat_template", "--log_samples",
            "--limit", str(args.limit), "--batch_size", str(args.batch_size), "--device", args.device,
            "--output_path", str(out_dir)]


def scores(out_dir: Path) -> dict[str, float]:
    """{task/metric: value} from the results JSON either command wrote under out_dir."""
    found = sorted(out_dir.rglob("results*.json"))
    if not found:
        raise RuntimeError(f"no results JSON under {out_dir}")
    results = json.loads(found[-1].read_text())["results"]
    return {f"{task}/{key.split(',')[0]}": value for task, metrics in results.items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in key}


def run_once(variant: str, model: str, args: Any, workdir: Path, rep: int) -> dict[str, Any]:
    out_dir = workdir / f"{variant}-{rep}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = workdir / f"{variant}-{rep}.log"
    started = time.perf_counter()
    with log.open("w") as stderr:
        proc = subprocess.Popen(command(variant, model, args, out_dir), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        while True:  # os.wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would mix runs)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > args.timeout:
                proc.kill()
                raise RuntimeError(f"{variant} ran past --timeout {args.timeout} s")
            time.sleep(0.02)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"variant": variant, "rep": rep, "wall_s": wall, "items_per_s": args.limit / wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "scores": scores(out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], reps=3, steps=0)
    parser.add_argument("--model", default="tiny", help="model dir or 'tiny' (built on first use)")
    parser.add_argument("--tasks", default="yulan_math")
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    from yulan_tune.tiny import resolve_tiny

    model = resolve_tiny(args.model, "model")
    print(f"evaluation throughput ({args.device}): {args.tasks}, limit {args.limit}, batch {args.batch_size}, "
          f"{args.reps} interleaved repetitions, model {model}")
    runs: dict[str, list[dict[str, Any]]] = {CANDIDATE: [], BASELINE: []}
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        for rep, variant in interleaved_order([CANDIDATE, BASELINE], args.reps):
            result = run_once(variant, model, args, Path(tmp), rep)
            runs[variant].append(result)
            print(f"  rep {rep} {variant:>10}: {result['wall_s']:6.1f} s, {result['items_per_s']:5.2f} items/s, "
                  f"{result['cpu_s']:.0f} CPU s, peak {result['peak_rss_mib']:.0f} MiB, {result['scores']}")
    mismatched = [r for r in runs[BASELINE] + runs[CANDIDATE] if r["scores"] != runs[CANDIDATE][0]["scores"]]
    ratios = [b["wall_s"] / c["wall_s"] for c, b in zip(runs[CANDIDATE], runs[BASELINE])]
    # per CPU-second: on a shared machine the wall clock of one run moves with the others' load, its CPU time less
    cpu_ratios = [b["cpu_s"] / c["cpu_s"] for c, b in zip(runs[CANDIDATE], runs[BASELINE])]
    summary = {variant: {key: median([r[key] for r in rs]) for key in ("wall_s", "items_per_s", "cpu_s", "peak_rss_mib")}
               for variant, rs in runs.items()}
    summary["throughput_ratio"] = {"median": median(ratios), "min": min(ratios), "max": max(ratios)}
    summary["cpu_throughput_ratio"] = {"median": median(cpu_ratios), "min": min(cpu_ratios), "max": max(cpu_ratios)}
    summary["scores_agree"] = not mismatched
    env = environment()
    r = summary["throughput_ratio"]
    print(f"  throughput {CANDIDATE}/{BASELINE}: {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}); "
          f"per CPU-second {summary['cpu_throughput_ratio']['median']:.2f}x; "
          f"scores {'agree' if not mismatched else 'DIFFER: the comparison is void'}")
    if args.write_results and not mismatched:
        c, b = summary[CANDIDATE], summary[BASELINE]
        append_results(f"eval-{args.device}", [
            f"| {env['date'][:10]} | {env['device']} | {args.tasks}, limit {args.limit}, batch {args.batch_size}, "
            f"{args.reps} reps | {fmt(c['items_per_s'], 2)} / {fmt(b['items_per_s'], 2)} | **{r['median']:.2f}x** "
            f"({r['min']:.2f}-{r['max']:.2f}) | {fmt(c['peak_rss_mib'] / 1024, 2)} / {fmt(b['peak_rss_mib'] / 1024, 2)} GiB RSS | "
            f"{fmt(c['cpu_s'])} / {fmt(b['cpu_s'])} CPU s ({summary['cpu_throughput_ratio']['median']:.2f}x) | {fmt(c['wall_s'])} / {fmt(b['wall_s'])} s | {versions_label(env)}; "
            f"lm_eval {env['versions'].get('lm_eval', '-')}; load {fmt(env['load_average_1min'])} |"])
    save_json(args.json, {"environment": env, "runs": runs, "summary": summary})
    return 0 if not mismatched else 1


if __name__ == "__main__":
    raise SystemExit(main())
