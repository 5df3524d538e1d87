"""The plots and the self-contained HTML report of a training-dynamics table (evaluation/dynamics.py).

`write_report(table, out_dir)` draws the main trajectories as PNGs under `out_dir/plots/` (matplotlib, Agg backend:
no display needed) and writes one HTML file holding them as base64 images, the checkpoints (step, form, content hash,
duplicates), a summary per checkpoint and the whole tidy table. The x axis is the training step when every checkpoint
has a distinct known step, else the checkpoints' order.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PLOTS_DIR = "plots"


def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer index or None, the tensor's name within its layer): "model.layers.3.self_attn.q_proj.weight" ->
    (3, "self_attn.q_proj.weight"); "model.embed_tokens.weight" -> (None, "model.embed_tokens.weight")."""
    match = re.search(r"layers\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def _x_axis(table: pd.DataFrame) -> tuple[dict[str, float], str, list[str]]:
    """checkpoint -> x position, the axis label, the checkpoints in order."""
    order = list(dict.fromkeys(table["checkpoint"]))
    steps = table.drop_duplicates("checkpoint").set_index("checkpoint")["step"]
    known = [steps[name] for name in order if not pd.isna(steps[name])]
    if len(known) == len(order) and len(set(known)) == len(order):
        return {name: float(steps[name]) for name in order}, "training step", order
    return {name: float(i) for i, name in enumerate(order)}, "checkpoint (in analysis order)", order


def _lines(ax: Any, table: pd.DataFrame, x: dict[str, float], series: dict[str, pd.Series], *, title: str,
           ylabel: str, log: bool = False) -> None:
    for label, values in series.items():
        points = sorted((x[c], v) for c, v in values.items() if c in x and pd.notna(v))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if 0 < len(series) <= 16:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)


def _by_layer(table: pd.DataFrame, metric: str) -> dict[str, pd.Series]:
    part = table[table["metric"] == metric]
    return {layer: group.set_index("checkpoint")["value"] for layer, group in part.groupby("layer", sort=True)}


def _by_kind(table: pd.DataFrame, metric: str) -> dict[str, pd.Series]:
    """Mean over layers of each tensor kind (q_proj, down_proj, ...); whole-model tensors on their own."""
    part = table[(table["metric"] == metric) & (table["layer"] != "all")].copy()
    if part.empty:
        return {}
    part["kind"] = [tensor_kind(name)[1] for name in part["layer"]]
    return {kind: group.groupby("checkpoint")["value"].mean() for kind, group in part.groupby("kind", sort=True)}


def _prefixed(table: pd.DataFrame, prefix: str) -> dict[str, pd.Series]:
    part = table[table["metric"].str.startswith(prefix)]
    return {metric[len(prefix):]: group.set_index("checkpoint")["value"]
            for metric, group in part.groupby("metric", sort=True)}


def _figures(table: pd.DataFrame) -> list[tuple[str, str, list[tuple[dict[str, pd.Series], str, str, bool]]]]:
    """(file stem, caption, panels); a panel: (series, title, y label, log scale). Empty panels are dropped."""
    whole = table[(table["metric"] == "relative_weight_change") & (table["layer"] == "all")]
    total_norm = table[(table["metric"] == "weight_norm") & (table["layer"] == "all")]
    figures = [
        ("probe_loss", "Held-out loss per probe domain",
         [(_prefixed(table, "probe_loss/"), "probe loss", "nats / token", False)]),
        ("hidden_states", "Hidden-state RMS and attention entropy per layer on the probe",
         [(_by_layer(table, "hidden_states_rms"), "hidden-state RMS", "rms", True),
          (_by_layer(table, "attention_entropy"), "attention entropy", "nats", False)]),
        ("cka", "Linear CKA of each layer's representations",
         [(_by_layer(table, "cka_previous"), "CKA with the previous checkpoint", "CKA", False),
          (_by_layer(table, "cka_last"), "CKA with the last checkpoint", "CKA", False)]),
        ("weight_change", "Relative weight change between consecutive checkpoints",
         [({"whole model": whole.set_index("checkpoint")["value"]} if not whole.empty else {}, "whole model",
           "||dW|| / ||W||", True),
          (_by_kind(table, "relative_weight_change"), "per tensor kind (mean over layers)", "||dW|| / ||W||", True)]),
        ("weight_norms", "Norms of the effective weights",
         [({"whole model": total_norm.set_index("checkpoint")["value"]} if not total_norm.empty else {},
           "Frobenius norm, whole model", "norm", False),
          (_by_kind(table, "weight_norm_per_sqrt_numel"), "norm / sqrt(numel) per kind (mean over layers)", "",
           True)]),
        ("spectra", "Spectral norm and stable rank of the matrices (mean over layers)",
         [(_by_kind(table, "spectral_norm"), "spectral norm", "sigma_max", True),
          (_by_kind(table, "stable_rank"), "stable rank", "||W||_F^2 / sigma_max^2", True)]),
        ("wesar", "WeSaR scalars (yulanmini checkpoints; mean over layers)",
         [(_by_kind(table, "wesar_scalar"), "WeSaR scalars", "value", False)]),
        ("tasks", "lm-eval task metrics", [(_prefixed(table, "task/"), "tasks", "score", False)]),
    ]
    kept = []
    for stem, caption, panels in figures:
        panels = [panel for panel in panels if panel[0]]
        if panels:
            kept.append((stem, caption, panels))
    return kept


def write_plots(table: pd.DataFrame, out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """The PNGs under out_dir/plots/; returns (path, caption) of each."""
    plots = Path(out_dir) / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    x, xlabel, order = _x_axis(table)
    written = []
    for stem, caption, panels in _figures(table):
        figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
        for ax, (series, title, ylabel, log) in zip(axes[0], panels):
            _lines(ax, table, x, series, title=title, ylabel=ylabel, log=log)
            ax.set_xlabel(xlabel, fontsize=9)
            if xlabel.startswith("checkpoint"):
                ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7, ha="right")
        figure.suptitle(caption, fontsize=11)
        figure.tight_layout()
        path = plots / f"{stem}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append((path, caption))
    return written


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint: the probe losses, task scores and means over layers of the main statistics."""
    order = list(dict.fromkeys(table["checkpoint"]))
    columns: dict[str, pd.Series] = {}
    for metric, group in table[table["metric"].str.startswith(("probe_loss/", "task/"))].groupby("metric"):
        columns[metric] = group.set_index("checkpoint")["value"]
    means = {"hidden_states_rms": "mean hidden RMS", "attention_entropy": "mean attention entropy",
             "cka_previous": "mean CKA previous", "cka_last": "mean CKA last"}
    for metric, label in means.items():
        part = table[table["metric"] == metric]
        if not part.empty:
            columns[label] = part.groupby("checkpoint")["value"].mean()
    for metric, label in (("relative_weight_change", "relative weight change"), ("weight_norm", "weight norm")):
        part = table[(table["metric"] == metric) & (table["layer"] == "all")]
        if not part.empty:
            columns[label] = part.set_index("checkpoint")["value"]
    summary = pd.DataFrame(columns).reindex(order)
    steps = table.drop_duplicates("checkpoint").set_index("checkpoint")["step"]
    summary.insert(0, "step", steps.reindex(order))
    return summary


def _html_table(frame: pd.DataFrame, *, index: bool = True, table_id: str = "") -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.6g}"
        return "" if value is None or value is pd.NA else html.escape(str(value))

    head = ([html.escape(str(frame.index.name or ""))] if index else []) + [html.escape(str(c)) for c in frame.columns]
    lines = [f'<table{f" id={chr(34)}{table_id}{chr(34)}" if table_id else ""}><thead><tr>'
             + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for key, row in frame.iterrows():
        cells = ([cell(key)] if index else []) + [cell(v) for v in row.tolist()]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #ddd}.dup{color:#b00;font-weight:bold}details{margin:1em 0}"""


def write_report(table: pd.DataFrame, out_dir: str | os.PathLike, *, html_name: str = "report.html",
                 title: str = "Training dynamics") -> dict[str, Any]:
    """Plots + one self-contained HTML file (images embedded). Returns {"report": path, "plots": [paths]}."""
    out = Path(out_dir)
    plots = write_plots(table, out)
    checkpoints = pd.DataFrame(table.attrs.get("checkpoints", []))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if not checkpoints.empty:
        shown = checkpoints.assign(content_hash=checkpoints["content_hash"].str[:16])
        duplicates = shown[shown["duplicate_of"].notna()]
        parts.append(f"<h2>Checkpoints</h2><p>{len(shown)} checkpoints, analysed in this order, one model at a "
                     "time; statistics on the effective (folded) weights.</p>")
        for _, row in duplicates.iterrows():
            parts.append(f"<p class='dup'>{html.escape(str(row['name']))} has the same weights as "
                         f"{html.escape(str(row['duplicate_of']))} (content hash {row['content_hash']})</p>")
        parts.append(_html_table(shown.set_index("name"), table_id="checkpoints"))
    probe = table.attrs.get("probe") or {}
    if probe:
        parts.append("<h2>Probe</h2>" + _html_table(pd.DataFrame(probe).T, table_id="probe"))
    parts.append("<h2>Summary</h2>" + _html_table(summary_table(table), table_id="summary"))
    parts.append("<h2>Trajectories</h2>")
    for path, caption in plots:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(f"<h2>Table</h2><details><summary>all {len(table)} rows (checkpoint, step, metric, layer, value)"
                 "</summary>" + _html_table(table, index=False, table_id="table") + "</details>")
    parts.append("</body></html>")
    report = out / html_name
    report.write_text("\n".join(parts), encoding="utf-8")
    return {"report": report, "plots": [path for path, _ in plots]}
