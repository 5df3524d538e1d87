"""Turning the runs of a benchmark into its report: medians and per-repetition ratios, the printed summary, the
benchmarks/RESULTS.md row (with the device, library versions and machine load that make it comparable) and the
JSON of every run."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def report_comparison(args: argparse.Namespace, settings: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
                      candidate: str, baseline: str, table: str, describe: Callable[[dict[str, Any]], str]
                      ) -> dict[str, Any]:
    """Compare candidate with baseline, print the summary, append the RESULTS.md row of `table` (`describe(summary)`
    names the benchmark) when asked, save everything as JSON when asked; returns the summary."""
    env = environment()
    summary = compare(runs, candidate, baseline)
    print(summary_text(summary))
    if args.write_results:
        append_results(f"{table}-{args.device}", [comparison_row(describe(summary), summary, env)])
    save_json(args.json, {"settings": settings, "environment": env, "runs": runs, "summary": summary})
    return summary


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def compare(results: dict[str, list[dict[str, Any]]], candidate: str, baseline: str) -> dict[str, Any]:
    """Medians of each variant and the median of per-repetition ratios candidate / baseline."""
    def per_rep(variant: str, key: str) -> list[float]:
        return [r[key] for r in sorted(results[variant], key=lambda r: r["rep"])]

    def ratio(key: str) -> dict[str, float]:
        ratios = [c / b for c, b in zip(per_rep(candidate, key), per_rep(baseline, key))]
        return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}

    memory_key = "peak_gpu_mib" if "peak_gpu_mib" in results[candidate][0] else "peak_rss_mib"
    summary: dict[str, Any] = {"candidate": candidate, "baseline": baseline, "memory_key": memory_key,
                               "reps": len(results[candidate])}
    for variant in (candidate, baseline):
        summary[variant] = {key: median(per_rep(variant, key)) for key in
                            ("trained_tokens_per_s", "input_tokens_per_s", "wall_s", memory_key)}
        cpu_rates = per_rep(variant, "trained_tokens_per_cpu_s")
        if all(x is not None for x in cpu_rates):
            summary[variant]["trained_tokens_per_cpu_s"] = median(cpu_rates)
        mfu = per_rep(variant, "mfu_reference") if "mfu_reference" in results[variant][0] else []
        if mfu and all(x is not None for x in mfu):
            summary[variant]["mfu_reference"] = median(mfu)
            summary[variant]["mfu_gqa_exact"] = median(per_rep(variant, "mfu_gqa_exact"))
    summary["tokens_per_s_ratio"] = ratio("trained_tokens_per_s")
    summary["memory_ratio"] = ratio(memory_key)
    if "trained_tokens_per_cpu_s" in summary[candidate] and "trained_tokens_per_cpu_s" in summary[baseline]:
        summary["tokens_per_cpu_s_ratio"] = ratio("trained_tokens_per_cpu_s")
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    c, b = summary["candidate"], summary["baseline"]
    memory = summary["memory_key"]
    lines = [f"median of {summary['reps']} interleaved repetitions:"]
    for variant in (c, b):
        m = summary[variant]
        extra = f", MFU {100 * m['mfu_reference']:.1f}% (reference formula)" if "mfu_reference" in m else ""
        lines.append(f"  {variant:>12}: {m['trained_tokens_per_s']:10.1f} trained tok/s, {m['wall_s']:7.2f} s timed, "
                     f"{memory} {m[memory]:9.1f}{extra}")
    r = summary["tokens_per_s_ratio"]
    lines.append(f"  tokens/s ratio {c}/{b}: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    r = summary["memory_ratio"]
    lines.append(f"  {memory} ratio {c}/{b}: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    if "tokens_per_cpu_s_ratio" in summary:
        r = summary["tokens_per_cpu_s_ratio"]
        lines.append(f"  tokens per CPU-second ratio: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    return "\n".join(lines)


def comparison_row(what: str, summary: dict[str, Any], env: dict[str, Any]) -> str:
    """One RESULTS.md row: candidate vs baseline medians, the median per-repetition ratio and its range."""
    c, b = summary[summary["candidate"]], summary[summary["baseline"]]
    key = summary["memory_key"]
    memory = "GPU" if key == "peak_gpu_mib" else "RSS"
    ratio, mem_ratio = summary["tokens_per_s_ratio"], summary["memory_ratio"]
    mfu = (f"{100 * c['mfu_reference']:.1f}% / {100 * b['mfu_reference']:.1f}%" if "mfu_reference" in c else "-")
    return (f"| {env['date'][:10]} | {env['device']} | {what} | {fmt(c['trained_tokens_per_s'])} / "
            f"{fmt(b['trained_tokens_per_s'])} | **{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
            f"{c[key] / 1024:.2f} / {b[key] / 1024:.2f} GiB {memory} ({mem_ratio['median']:.2f}x) | {mfu} | "
            f"{fmt(c['wall_s'])} / {fmt(b['wall_s'])} s | {versions_label(env)}; load {fmt(env['load_average_1min'])} |")


def single_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one variant's runs (no baseline)."""
    keys = ["trained_tokens_per_s", "wall_s", "peak_rss_mib"] + [
        k for k in ("peak_gpu_mib", "mfu_reference", "mfu_gqa_exact") if runs[0].get(k) is not None]
    return {"reps": len(runs), **{k: median([r[k] for r in runs]) for k in keys}}


def single_row(what: str, summary: dict[str, Any], env: dict[str, Any]) -> str:
    memory = (f"{summary['peak_gpu_mib'] / 1024:.2f} GiB peak GPU" if "peak_gpu_mib" in summary
              else f"{summary['peak_rss_mib'] / 1024:.2f} GiB peak RSS")
    mfu = f"{100 * summary['mfu_reference']:.1f}%" if summary.get("mfu_reference") is not None else "-"
    return (f"| {env['date'][:10]} | {env['device']} | {what}, {summary['reps']} runs | "
            f"{fmt(summary['trained_tokens_per_s'])} / - | - | {memory} | {mfu} | {fmt(summary['wall_s'])} s | "
            f"{versions_label(env)} |")


# ---------------------------------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Device, library versions, date and machine load: what a results row must say to be comparable."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.cuda.get_device_name()
    else:
        cpu_name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
        device = f"CPU {cpu_name}, {os.cpu_count()} cores"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {name: version(name) for name in
                     ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel", "lm_eval")},
        "python": platform.python_version(),
    }


def versions_label(env: dict[str, Any]) -> str:
    v = env["versions"]
    parts = [f"torch {v['torch']}", f"transformers {v['transformers']}", f"trl {v['trl']}"]
    parts += [f"{name} {v[name]}" for name in ("peft", "bitsandbytes", "liger-kernel") if v.get(name, "-") != "-"]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- RESULTS.md


def append_results(section: str, rows: Sequence[str], path: Path = RESULTS_MD) -> None:
    """Insert markdown table rows just above the `<!-- rows:section -->` marker that closes that section's table."""
    marker = f"<!-- rows:{section} -->"
    text = path.read_text(encoding="utf-8")
    if marker not in text:
        raise ValueError(f"{path} has no {marker} line to append {section} rows above")
    text = text.replace(marker, "\n".join(rows) + "\n" + marker, 1)
    path.write_text(text, encoding="utf-8")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def save_json(path: str | os.PathLike | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))
