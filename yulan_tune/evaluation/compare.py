"""Several evaluated runs side by side: one table, a paired significance test per per-sample metric, a PNG chart.

Runs are `harness.EvalRun`s of the same tasks (the output directories of `yulan-tune eval --tasks`, or runs made on
the spot). Per-sample 0/1 metrics (acc, acc_norm, exact_match, ...) are paired by lm-eval's `doc_id` and compared with
McNemar's exact test against the first run (`evaluation.paired`); metrics that are not per-sample 0/1 (perplexity,
group aggregates) get the table and the chart only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yulan_tune.evaluation.harness import EvalRun
from yulan_tune.evaluation.paired import PairedComparison, compare_paired

COMPARISON_FILE = "comparison.json"
CHART_FILE = "comparison.png"


@dataclass(frozen=True)
class PairedRow:
    task: str
    metric: str
    baseline: str
    other: str
    comparison: PairedComparison

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "baseline": self.baseline, "other": self.other,
                **self.comparison.as_dict()}


def metric_table(runs: Mapping[str, EvalRun]) -> tuple[list[tuple[str, str]], dict[str, dict[tuple[str, str], float]]]:
    """The (task, metric) keys in the order they first appear, and each run's value for each."""
    keys: list[tuple[str, str]] = []
    values: dict[str, dict[tuple[str, str], float]] = {}
    for label, run in runs.items():
        values[label] = {}
        for row in run.rows():
            key = (row.task, row.metric)
            values[label][key] = row.value
            if key not in keys:
                keys.append(key)
    return keys, values


def binary_metrics(run: EvalRun, task: str) -> list[str]:
    """The metrics of `task` whose per-sample values are all 0 or 1."""
    records = run.samples.get(task, [])
    names = records[0].get("metrics", []) if records else []
    return [name for name in names
            if records and all(isinstance(r.get(name), (int, float, bool)) and float(r[name]) in (0.0, 1.0)
                               for r in records)]


def paired_tests(runs: Mapping[str, EvalRun]) -> list[PairedRow]:
    """Each later run against the first, on every task and per-sample 0/1 metric they share (paired by doc_id)."""
    labels = list(runs)
    if len(labels) < 2:
        return []
    baseline_label, baseline = labels[0], runs[labels[0]]
    rows = []
    for task in baseline.samples:
        for metric in binary_metrics(baseline, task):
            before = baseline.per_sample(task, metric)
            for label in labels[1:]:
                other = runs[label]
                if metric not in binary_metrics(other, task):
                    continue
                after = other.per_sample(task, metric)
                shared = sorted(set(before) & set(after))
                if not shared:
                    continue
                comparison = compare_paired([before[i] == 1.0 for i in shared], [after[i] == 1.0 for i in shared])
                rows.append(PairedRow(task, metric, baseline_label, label, comparison))
    return rows


def format_comparison(runs: Mapping[str, EvalRun], paired: Sequence[PairedRow]) -> list[str]:
    """The table: a row per task and metric, a column per run; then one line per paired test."""
    keys, values = metric_table(runs)
    labels = list(runs)
    task_width = max([len("task"), *(len(t) for t, _ in keys)])
    metric_width = max([len("metric"), *(len(m) for _, m in keys)])
    col = max([10, *(len(label) for label in labels)])
    lines = [f"{'task':<{task_width}}  {'metric':<{metric_width}}  " + "  ".join(f"{lb:>{col}}" for lb in labels)]
    for key in keys:
        cells = [values[label].get(key) for label in labels]
        lines.append(f"{key[0]:<{task_width}}  {key[1]:<{metric_width}}  "
                     + "  ".join(f"{v:>{col}.4f}" if v is not None else f"{'-':>{col}}" for v in cells))
    for row in paired:
        c = row.comparison
        lines.append(f"{row.task} {row.metric}: {row.other} vs {row.baseline} on {c.n} paired samples: "
                     f"{c.before:.4f} -> {c.after:.4f}, newly right {c.newly_right}, newly wrong {c.newly_wrong}, "
                     f"McNemar p={c.mcnemar_p:.3g}")
    return lines


def plot_comparison(runs: Mapping[str, EvalRun], path: str | os.PathLike) -> Path:
    """Grouped bars: one group per task and metric, one bar per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, values = metric_table(runs)
    labels = list(runs)
    width = 0.8 / max(len(labels), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) * max(1, len(labels)) / 2 + 2), 4.5))
    for index, label in enumerate(labels):
        heights = [values[label].get(key, math.nan) for key in keys]
        axes.bar([k + (index - (len(labels) - 1) / 2) * width for k in range(len(keys))], heights, width, label=label)
    axes.set_xticks(range(len(keys)))
    axes.set_xticklabels([f"{task}\n{metric}" for task, metric in keys], fontsize=8)
    axes.set_ylabel("value")
    axes.set_title("yulan-tune compare")
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def write_comparison(out_dir: str | os.PathLike, runs: Mapping[str, EvalRun], paired: Sequence[PairedRow],
                     sources: Mapping[str, str]) -> tuple[Path, Path]:
    """`comparison.json` (values, paired tests, where each run came from) and `comparison.png` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys, values = metric_table(runs)
    document = {
        "runs": {label: {"source": sources.get(label), "metrics": {f"{t}/{m}": values[label].get((t, m))
                                                                   for t, m in keys}} for label in runs},
        "paired": [row.as_dict() for row in paired],
    }
    (out / COMPARISON_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return out / COMPARISON_FILE, plot_comparison(runs, out / CHART_FILE)

