"""`yulan-tune dynamics CKPT [CKPT ...] --out DIR`: training dynamics of a series of checkpoints (weight norms and
spectra of the effective weights, WeSaR scalars, hidden states, attention entropy, probe loss, CKA, weight change,
duplicate detection; optional lm-eval tasks), written as dynamics.csv / dynamics.json / plots / report.html.
The analysis is `yulan_tune.evaluation.dynamics.analyse_dynamics`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from yulan_tune.commands.eval import limit_value, split_list
from yulan_tune.console import elapsed, summary, write_metrics
from yulan_tune.evaluation.dynamics import CSV_FILE, JSON_FILE, REPORT_FILE, DynamicsSettings, analyse_dynamics
from yulan_tune.tiny import resolve_tiny


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yulan-tune dynamics",
        description="Analyse a series of checkpoints (one model in memory at a time), ordered by training step.")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="model dirs (yulanmini or Llama form), training output dirs (their checkpoint-N dirs), "
                             "hub ids, or 'tiny'")
    parser.add_argument("--out", required=True, help="output directory (dynamics.csv, dynamics.json, plots/, "
                                                     "report.html)")
    parser.add_argument("--probe", action="append", default=None, metavar="[NAME=]FILE",
                        help="probe text, one domain per file (JSONL, JSON, Parquet, CSV, txt, a directory of them); "
                             "repeatable; default: the bundled held-out code and math")
    parser.add_argument("--probe-rows", type=positive_int, default=4, help="probe rows per domain (default 4)")
    parser.add_argument("--probe-seq-len", type=positive_int, default=256, help="tokens per probe row (default 256)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="probe rows per forward pass")
    parser.add_argument("--tokenizer", default=None, help="one tokenizer for the whole series (default: each "
                                                          "checkpoint's own)")
    parser.add_argument("--device", default=None, help="where the probe runs (default: cuda if available, else cpu)")
    tasks = parser.add_argument_group("optional lm-eval tasks per checkpoint")
    tasks.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (e.g. yulan_math)")
    tasks.add_argument("--limit", default=None, help="at most N documents per task (or a fraction < 1)")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="shots for every task (default: each task's)")
    tasks.add_argument("--include-path", action="append", default=[], help="a directory of your own task YAMLs")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    checkpoints = [resolve_tiny(name, "model") for name in args.checkpoints]
    settings = DynamicsSettings(
        probe_files=args.probe, probe_rows=args.probe_rows, probe_seq_len=args.probe_seq_len,
        batch_size=args.batch_size, tasks=split_list(args.tasks) or None, task_limit=limit_value(args.limit),
        num_fewshot=args.num_fewshot, include_path=args.include_path or None, tokenizer=args.tokenizer,
        device=args.device)
    table = analyse_dynamics(checkpoints, args.out, settings=settings)
    out = Path(args.out)
    infos = table.attrs["checkpoints"]
    duplicates = [f"{info['name']} = {info['duplicate_of']}" for info in infos if info["duplicate_of"]]
    last = infos[-1]["name"]
    losses = table[(table["checkpoint"] == last) & table["metric"].str.startswith("probe_loss/")]
    write_metrics(out, {"checkpoints": infos, "rows": len(table), "seconds": round(time.time() - started, 1)})
    lines = [f"{len(infos)} checkpoints analysed ({elapsed(started)}), {len(table)} rows",
             "probe loss of " + last + ": " + ", ".join(f"{m.split('/', 1)[1]} {v:.4f}"
                                                       for m, v in zip(losses["metric"], losses["value"]))]
    lines.append("duplicates: " + ", ".join(duplicates) if duplicates else "no duplicate checkpoints")
    lines.append(f"table {out / CSV_FILE} and {out / JSON_FILE}; report {out / REPORT_FILE}")
    summary("dynamics", lines)
    return 0
