"""Training dynamics of a series of checkpoints: weight, activation and representation statistics, one model at a time.

    from yulan_tune.evaluation.dynamics import analyse_dynamics
    table = analyse_dynamics(["out/pretrain_tiny"], out_dir="out/dynamics")   # a pandas DataFrame

What is measured, per checkpoint (the `metric` and `layer` columns of the tidy table):

    weight_norm, weight_norm_per_numel,        every tensor of the effective weights (the reference script's three
    weight_norm_per_sqrt_numel                 measures; layer = the tensor's Llama name, "all" for the whole model)
    spectral_norm, stable_rank                 every matrix; stable rank = ||W||_F^2 / ||W||_2^2. Exact (SVD) when one
                                               side has at most EXACT_SPECTRAL_MAX_DIM entries, else a seeded
                                               randomized subspace-iteration estimate (`torch.svd_lowrank`)
    wesar_scalar                               every WeSaR scalar of a yulanmini checkpoint (layer = its name)
    hidden_states_{rms,var,mean}               per decoder layer on the probe (layer = embed, layer_00, ...), the
                                               hidden-state monitor's statistics (training/monitor.py)
    attention_entropy                          per layer: entropy (nats) of each query's attention distribution,
                                               averaged over heads, positions and rows
    probe_loss/<domain>                        held-out next-token loss per probe domain (mean over predicted tokens)
    task/<task>/<metric>                       optional lm-eval tasks (evaluation/harness.py)
    cka_previous, cka_last                     linear CKA (Kornblith et al. 2019) of each layer's probe
                                               representations with the previous and with the last checkpoint
    relative_weight_change                     ||W_t - W_{t-1}||_F / ||W_{t-1}||_F per tensor and "all"
    duplicate                                  1 when the content hash of the effective weights equals an earlier
                                               checkpoint's (which one: the `checkpoints` part of dynamics.json)

Effective weights: a yulanmini checkpoint is folded into its Llama form by `modeling.convert.to_llama` (WeSaR scalars,
muP factors and the residual / embedding / logit multipliers multiplied into the matrices), so a yulanmini checkpoint
and its `to_llama` export give the same statistics; every probe statistic is computed on that Llama model too.

Memory: one model at a time: the checkpoint in its stored dtype, then (both while folding) its fp32 Llama form. What
later checkpoints compare against stays on disk in a scratch folder: the previous checkpoint's effective weights (safetensors, read one tensor at a time) and each
checkpoint's probe representations. The probe is the bundled held-out text (`data.bundled.heldout_documents`) or the
user's files (any format `data.records.iter_records` reads), cut into `rows` rows of `seq_len` tokens per domain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.console import progress
from yulan_tune.data.bundled import heldout_documents
from yulan_tune.data.records import iter_records
from yulan_tune.evaluation.dynamics_report import write_report
from yulan_tune.evaluation.harness import YuLanLM, plan_tasks, run_tasks
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.modeling.convert import to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM
from yulan_tune.training.checkpoints import checkpoint_step as name_step
from yulan_tune.training.checkpoints import list_checkpoints, read_checkpoint_record
from yulan_tune.training.monitor import STATISTICS, find_decoder_layers, hidden_state_statistics

logger = logging.getLogger(__name__)

COLUMNS = ("checkpoint", "step", "metric", "layer", "value")
CSV_FILE, JSON_FILE, REPORT_FILE = "dynamics.csv", "dynamics.json", "report.html"
EXACT_SPECTRAL_MAX_DIM = 1024  # a matrix with a side at most this long gets an exact SVD
RANDOMIZED_RANK, RANDOMIZED_ITERATIONS = 16, 8
METRICS_FILE = "yulan_tune_metrics.json"  # what our recipes write into their output dirs (console.write_metrics)


class CheckpointError(ValueError):
    """A checkpoint argument that cannot be analysed (what to pass instead is in the message)."""


@dataclass
class CheckpointInfo:
    """One analysed checkpoint: its label in the table, where it came from, its step (None when unknown), its form,
    the sha256 of its effective weights and the earlier checkpoint with the same hash, if any."""

    name: str
    path: str
    step: int | None
    form: str = ""
    content_hash: str = ""
    duplicate_of: str | None = None
    seconds: float = 0.0


@dataclass
class Probe:
    """Token rows per domain ([rows, seq_len] int64 each), fixed for the whole series."""

    domains: dict[str, torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(rows.numel() for rows in self.domains.values())


# ------------------------------------------------------------------------------------------------ checkpoints


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def training_step(path: str | os.PathLike) -> int | None:
    """The optimizer step a local checkpoint directory was saved at, where it says so: its completion record
    (PretrainRecipe), trainer_state.json (any Trainer checkpoint) or a `checkpoint-N` name, plus the step its config
    says training started from (`num_steps_trained_before_this_epoch`: an anneal's source step); an anneal's output
    dir (its metrics' end_step); a pretraining run's final/ (the run's global_step). None when nothing tells."""
    path = Path(path)
    config = _read_json(path / "config.json") or {}
    offset = int(config.get("num_steps_trained_before_this_epoch") or 0)
    record = read_checkpoint_record(path) or {}
    state = _read_json(path / "trainer_state.json") or {}
    for step in (record.get("global_step"), state.get("global_step"), name_step(path)):
        if step is not None:
            return offset + int(step)
    metrics = _read_json(path / METRICS_FILE) or {}
    if metrics.get("end_step") is not None:
        return int(metrics["end_step"])
    if path.name in ("final", "final-llama"):
        parent = _read_json(path.parent / METRICS_FILE) or {}
        if parent.get("global_step") is not None:
            return int(parent["global_step"])
    return offset or None


def _hub_step(name: str) -> int | None:
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    return int(getattr(config, "num_steps_trained_before_this_epoch", 0) or 0) or None


def _expand(spec: str) -> list[Path] | None:
    """A local training output dir (no config.json, holding checkpoint-N dirs) -> its checkpoints, by step: the
    complete ones when the run writes completion records, else every checkpoint-N with a config.json."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.exists():
            raise CheckpointError(f"{spec}: no such directory (a checkpoint is a model directory, a training "
                                  "output directory or a hub id such as yulan-team/YuLan-Mini)")
        return None  # a hub id
    if (path / "config.json").is_file():
        return [path]
    complete, _ = list_checkpoints(path)
    if not complete:
        complete = sorted((p for p in path.glob("checkpoint-*") if (p / "config.json").is_file()
                           and name_step(p) is not None), key=name_step)
    if not complete:
        raise CheckpointError(f"{path}: neither a model directory (config.json) nor a training output directory "
                              "with checkpoint-N directories")
    return complete


def resolve_checkpoints(specs: Sequence[str | os.PathLike]) -> list[CheckpointInfo]:
    """The checkpoints to analyse, ordered by training step where it is known (those without a known step follow, in
    the given order). A training output dir stands for its checkpoints; anything that is not a local path is a hub
    id. Labels are the directory names, made unique with their parent's name where needed."""
    if not specs:
        raise CheckpointError("no checkpoints given")
    found: list[tuple[str, int | None]] = []
    for spec in specs:
        expanded = _expand(str(spec))
        if expanded is None:
            found.append((str(spec), _hub_step(str(spec))))
        else:
            found.extend((str(p), training_step(p)) for p in expanded)
    paths = [p for p, _ in found]
    if len(set(paths)) < len(paths):
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        raise CheckpointError(f"checkpoint given more than once: {', '.join(repeated)}")
    known = sorted((item for item in found if item[1] is not None), key=lambda item: item[1])
    unknown = [item for item in found if item[1] is None]
    if known and unknown:
        logger.warning("no training step known for %s: analysed after the checkpoints with a step",
                       ", ".join(p for p, _ in unknown))
    ordered = known + unknown
    labels = [Path(p).name or p for p, _ in ordered]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            parts = Path(ordered[i][0]).parts
            labels[i] = "/".join(parts[-2:]) if len(parts) > 1 else label
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label}#{i}"
    return [CheckpointInfo(name=label, path=p, step=step) for label, (p, step) in zip(labels, ordered)]


# ------------------------------------------------------------------------------------------------ the probe


def probe_documents(files: Sequence[str | os.PathLike] | None = None, *, text_field: str = "text",
                    txt_split: str = "blank_lines") -> dict[str, list[str]]:
    """Documents per probe domain: the bundled held-out text ("code", "math") by default; else one domain per file
    (`NAME=PATH`, or the file's stem), read by `data.records.iter_records` (JSONL, JSON, Parquet, CSV, text, a
    directory of those, a `datasets` directory)."""
    if not files:
        return heldout_documents()
    domains: dict[str, list[str]] = {}
    for item in files:
        text = str(item)
        name, _, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        name = name or Path(path).stem
        if name in domains:
            raise ValueError(f"probe domain {name!r} given twice; name them: --probe NAME=FILE")
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"probe file {path}: no such file or directory")
        documents = []
        for record in iter_records(Path(path).expanduser(), txt_split=txt_split):
            value = record.data.get(text_field)
            if not isinstance(value, str):
                raise ValueError(f"{record.where}: no text field {text_field!r} (fields: {sorted(record.data)})")
            if value.strip():
                documents.append(value)
        if not documents:
            raise ValueError(f"probe file {path}: no text")
        domains[name] = documents
    return domains


def build_probe(tokenizer: PreTrainedTokenizerBase, documents: dict[str, list[str]], *, rows: int = 4,
                seq_len: int = 256) -> Probe:
    """Each domain's documents tokenized (BOS as the tokenizer adds it, EOS after each), concatenated and cut into
    `rows` rows of `seq_len` tokens; a domain with fewer tokens gives as many whole rows as it has (one shorter row
    when it has less than `seq_len`)."""
    if rows < 1 or seq_len < 2:
        raise ValueError(f"the probe needs rows >= 1 and seq_len >= 2, got rows={rows}, seq_len={seq_len}")
    eos = tokenizer.eos_token_id
    domains, description = {}, {}
    for name, texts in documents.items():
        ids: list[int] = []
        for text in texts:
            ids += tokenizer(text, verbose=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(ids) >= rows * seq_len:
                break
        if len(ids) < 2:
            raise ValueError(f"probe domain {name!r} has fewer than 2 tokens")
        length = min(seq_len, len(ids))
        count = min(rows, len(ids) // length)
        domains[name] = torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
        description[name] = {"rows": count, "seq_len": length, "documents": len(texts)}
    return Probe(domains, description)


# ------------------------------------------------------------------------------------------------ statistics


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples ([n, d1], [n, d2]): HSIC(K, L) / sqrt(HSIC(K, K)
    HSIC(L, L)) with K = X X^T, L = Y Y^T of the column-centred X, Y (Kornblith et al. 2019, eq. for the linear
    kernel: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)). In float64; the n x n form when n is the smaller side.
    NaN when one representation is constant."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.detach().double().reshape(x.shape[0], -1)
    y = y.detach().double().reshape(y.shape[0], -1)
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    if x.shape[0] <= min(x.shape[1], y.shape[1]):
        k, gram_l = x @ x.T, y @ y.T
        hsic, norm_x, norm_y = (k * gram_l).sum(), k.norm(), gram_l.norm()
    else:
        hsic, norm_x, norm_y = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denominator = float(norm_x * norm_y)
    return float(hsic) / denominator if denominator > 0 else float("nan")


@torch.no_grad()
def spectral_norm(matrix: torch.Tensor, exact_max_dim: int = EXACT_SPECTRAL_MAX_DIM, seed: int = 0) -> float:
    """Largest singular value: exact when a side has at most `exact_max_dim` entries, else a seeded randomized
    subspace-iteration estimate (RANDOMIZED_RANK vectors, RANDOMIZED_ITERATIONS power iterations), which never
    exceeds the true value and is within a fraction of a percent of it for weight spectra."""
    w = matrix.detach().float()
    if min(w.shape) <= exact_max_dim:
        return float(torch.linalg.matrix_norm(w, ord=2))
    with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
        torch.manual_seed(seed)
        _, s, _ = torch.svd_lowrank(w, q=min(RANDOMIZED_RANK, min(w.shape)), niter=RANDOMIZED_ITERATIONS)
    return float(s[0])


NORM_CHUNK = 1 << 24  # elements per float64 chunk in `frobenius_norm` (128 MiB)


@torch.no_grad()
def frobenius_norm(tensor: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """||tensor|| (or ||tensor - minus||) accumulated in float64, a chunk at a time: never a float64 copy of a whole
    tensor (the 99,000 x 1,920 embedding would take 1.5 GB)."""
    flat = tensor.detach().reshape(-1)
    other = minus.detach().reshape(-1) if minus is not None else None
    total = 0.0
    for start in range(0, flat.numel(), NORM_CHUNK):
        part = flat[start:start + NORM_CHUNK].double()
        if other is not None:
            part -= other[start:start + NORM_CHUNK].double()
        total += float(torch.dot(part, part))
    return math.sqrt(total)


@torch.no_grad()
def weight_statistics(state: dict[str, torch.Tensor], *, exact_max_dim: int = EXACT_SPECTRAL_MAX_DIM
                      ) -> list[tuple[str, str, float]]:
    """(metric, tensor name, value) for every floating-point tensor of `state`, and the whole model's norm."""
    rows, total = [], 0.0
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        norm, numel = frobenius_norm(tensor), tensor.numel()
        total += norm * norm
        rows += [("weight_norm", name, norm), ("weight_norm_per_numel", name, norm / numel),
                 ("weight_norm_per_sqrt_numel", name, norm / math.sqrt(numel))]
        if tensor.ndim == 2:
            sigma = spectral_norm(tensor, exact_max_dim)
            rows += [("spectral_norm", name, sigma),
                     ("stable_rank", name, norm * norm / (sigma * sigma) if sigma > 0 else float("nan"))]
    rows.append(("weight_norm", "all", math.sqrt(total)))
    return rows


def wesar_scalars(model: PreTrainedModel) -> list[tuple[str, str, float]]:
    """Every WeSaR scalar (a yulanmini parameter named `*_alpha`) as (metric, name, value)."""
    return [("wesar_scalar", name, float(parameter.detach().reshape(-1)[0]))
            for name, parameter in model.named_parameters() if name.endswith("_alpha") and parameter.numel() == 1]


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes; in name order): equal exactly when the weights are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy() if tensor.numel() else np.zeros(0, np.uint8)))
    return digest.hexdigest()


def effective_model(model: PreTrainedModel) -> LlamaForCausalLM:
    """The Llama form every statistic is computed on: a yulanmini model folded by `to_llama` (fp32), a Llama as is
    (in fp32). Eager attention, so the attention probabilities can be read."""
    if isinstance(model, YuLanMiniForCausalLM):
        llama = to_llama(model, dtype=torch.float32)
    elif isinstance(model, LlamaForCausalLM):
        llama = model.float()
    else:
        raise CheckpointError(f"{type(model).__name__}: the dynamics analysis reads yulanmini and Llama checkpoints")
    llama.set_attn_implementation("eager")
    return llama.eval()


def _layer_keys(count: int) -> list[str]:
    width = max(2, len(str(count - 1)))  # as the hidden-state monitor names them
    return [f"layer_{i:0{width}d}" for i in range(count)]


@torch.no_grad()
def probe_statistics(model: LlamaForCausalLM, probe: Probe, *, batch_size: int = 4
                     ) -> tuple[list[tuple[str, str, float]], dict[str, torch.Tensor]]:
    """Forward the probe through `model` (a Llama with eager attention). Returns (rows, representations): the
    hidden-state statistics and attention entropy per layer and the loss per domain, and each layer's outputs as
    [probe tokens, hidden] float32 CPU tensors (embed = the first layer's input), domains in probe order."""
    layers = find_decoder_layers(model)
    keys = _layer_keys(len(layers))
    parts: dict[str, list[torch.Tensor]] = {"embed": [], **{key: [] for key in keys}}
    entropy = {key: [0.0, 0] for key in keys}

    def keep(key: str, hidden: torch.Tensor) -> None:
        parts[key].append(hidden.detach().float().reshape(-1, hidden.shape[-1]).cpu())

    def on_input(module, args, kwargs):
        keep("embed", args[0] if args else kwargs["hidden_states"])

    def on_output(key, module, args, output):
        keep(key, output[0] if isinstance(output, tuple) else output)

    def on_attention(key, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no probabilities; the analysis needs eager attention")
        per_query = torch.special.entr(weights.double()).sum(-1)  # [batch, heads, queries]; 0 log 0 = 0
        entropy[key][0] += float(per_query.sum())
        entropy[key][1] += per_query.numel()

    handles = [layers[0].register_forward_pre_hook(on_input, with_kwargs=True)]
    for key, layer in zip(keys, layers):
        handles.append(layer.register_forward_hook(lambda m, a, o, key=key: on_output(key, m, a, o)))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, key=key: on_attention(key, m, a, o)))
    device = next(model.parameters()).device
    rows: list[tuple[str, str, float]] = []
    try:
        for domain, ids in probe.domains.items():
            loss_sum, count = 0.0, 0
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start:start + batch_size].to(device)
                logits = model(input_ids=batch).logits
                for row in range(batch.shape[0]):  # float64, one row at a time (a row of 99,000-way logits)
                    loss_sum += float(F.cross_entropy(logits[row, :-1].double(), batch[row, 1:], reduction="sum"))
                count += batch[:, 1:].numel()
                del logits
            rows.append((f"probe_loss/{domain}", "", loss_sum / count))
    finally:
        for handle in handles:
            handle.remove()
    representations = {key: torch.cat(chunks) for key, chunks in parts.items()}
    for key, hidden in representations.items():
        for statistic, value in zip(STATISTICS, hidden_state_statistics(hidden).tolist()):
            rows.append((f"hidden_states_{statistic}", key, value))
    rows += [("attention_entropy", key, total / max(n, 1)) for key, (total, n) in entropy.items()]
    return rows, representations


# ------------------------------------------------------------------------------------------------ the series


@dataclass
class DynamicsSettings:
    """What `analyse_dynamics` measures and how (all optional)."""

    probe_files: list[str] | None = None  # None: the bundled held-out text
    probe_rows: int = 4
    probe_seq_len: int = 256
    batch_size: int = 4
    tasks: list[str] | None = None
    task_limit: int | float | None = None
    num_fewshot: int | None = None
    include_path: list[str] | None = None
    tokenizer: str | None = None  # default: each checkpoint's own
    device: str | None = None  # default: cuda when available, else cpu
    exact_max_dim: int = EXACT_SPECTRAL_MAX_DIM


class _Scratch:
    """Files the series keeps between checkpoints: the previous effective weights and every checkpoint's probe
    representations (one checkpoint's worth in memory at a time)."""

    def __init__(self, root: str | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="yulan-dynamics-", dir=root)
        self.path = Path(self._dir.name)

    def save_weights(self, state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Writes the unique tensors; returns name -> stored name (tied tensors are stored once)."""
        stored, seen, aliases = {}, {}, {}
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            stored[name] = tensor.detach().cpu().contiguous()
            aliases[name] = name
        save_file(stored, str(self.path / "previous.safetensors"))
        return aliases

    def weight_change(self, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> list[tuple[str, str, float]]:
        rows, change, base = [], 0.0, 0.0
        with safe_open(str(self.path / "previous.safetensors"), framework="pt") as previous:
            for name, tensor in state.items():
                if name not in aliases:
                    continue
                old = previous.get_tensor(aliases[name])
                if old.shape != tensor.shape:
                    raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} differs from the previous "
                                          f"checkpoint's {tuple(old.shape)}; the series must be one model's")
                delta, size = frobenius_norm(tensor, old.to(tensor.dtype)), frobenius_norm(old)
                change, base = change + delta * delta, base + size * size
                rows.append(("relative_weight_change", name, delta / size if size > 0 else float("nan")))
        rows.append(("relative_weight_change", "all", math.sqrt(change / base) if base > 0 else float("nan")))
        return rows

    def save_representations(self, index: int, representations: dict[str, torch.Tensor]) -> None:
        torch.save(representations, self.path / f"representations-{index}.pt")

    def representations(self, index: int) -> dict[str, torch.Tensor]:
        return torch.load(self.path / f"representations-{index}.pt", weights_only=True)

    def close(self) -> None:
        self._dir.cleanup()


def _cka_rows(metric: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[tuple[str, str, float]]:
    if a.keys() != b.keys():
        raise CheckpointError(f"{metric}: the checkpoints have different layers ({len(a)} vs {len(b)} "
                              "representations); the series must be one model's")
    return [(metric, key, linear_cka(a[key], b[key])) for key in a]


def stored_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (float32 when it does not say): the model is
    loaded in it, and only its folded Llama form is float32 (a bf16 release is not first widened to fp32)."""
    config = _read_json(Path(name_or_path) / "config.json")
    if config is None:
        try:
            config = AutoConfig.from_pretrained(name_or_path).to_dict()
        except (OSError, ValueError):
            config = {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def analyse_dynamics(checkpoints: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
                     settings: DynamicsSettings | None = None, show_progress: bool = True,
                     **setting_overrides: Any) -> pd.DataFrame:
    """Analyse `checkpoints` (model dirs, training output dirs, hub ids; see `resolve_checkpoints`) in step order, one
    model in memory at a time, and return the tidy table (columns COLUMNS; `table.attrs` holds "checkpoints" and
    "probe"). With `out_dir`: dynamics.csv, dynamics.json, plots/*.png and report.html are written there.
    Settings: a `DynamicsSettings` and/or its fields as keywords (probe_files=[...], tasks=[...], ...)."""
    settings = settings or DynamicsSettings()
    if setting_overrides:
        unknown = set(setting_overrides) - set(DynamicsSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        settings = DynamicsSettings(**{**asdict(settings), **setting_overrides})
    infos = resolve_checkpoints(checkpoints)
    documents = probe_documents(settings.probe_files)  # fails on a bad probe file before any model is loaded
    plan = plan_tasks(settings.tasks, include_path=settings.include_path) if settings.tasks else None
    device = torch.device(settings.device or _default_device())
    shared_tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None

    rows_of: list[list[tuple[str, str, float]]] = []  # per checkpoint
    probe: Probe | None = None
    hashes: dict[str, str] = {}
    scratch = _Scratch()
    previous_representations: dict[str, torch.Tensor] | None = None
    aliases: dict[str, str] | None = None
    bar = progress(infos, desc="dynamics", unit="checkpoint", enabled=show_progress)
    try:
        for index, info in enumerate(bar):
            started = time.time()
            bar.set_postfix_str(info.name)
            rows: list[tuple[str, str, float]] = []
            tokenizer = shared_tokenizer or load_tokenizer(info.path)
            this_probe = build_probe(tokenizer, documents, rows=settings.probe_rows, seq_len=settings.probe_seq_len)
            if probe is None:
                probe = this_probe
            elif any(not torch.equal(probe.domains[d], this_probe.domains[d]) for d in probe.domains):
                raise CheckpointError(f"{info.path}: its tokenizer cuts the probe into other tokens than the first "
                                      "checkpoint's; pass one --tokenizer for the whole series")
            loaded = load_model(info.path, dtype=stored_dtype(info.path), attn_implementation="eager",
                                device_map=None)
            info.form = "yulanmini" if isinstance(loaded, YuLanMiniForCausalLM) else "llama"
            rows += wesar_scalars(loaded)
            model = effective_model(loaded)
            del loaded  # one model in memory: the folded copy replaces the checkpoint's own form
            state = model.state_dict()
            info.content_hash = content_hash(state)
            info.duplicate_of = hashes.get(info.content_hash)
            hashes.setdefault(info.content_hash, info.name)
            if info.duplicate_of is not None:
                logger.warning("%s has the same weights as %s (content hash %s)", info.name, info.duplicate_of,
                               info.content_hash[:12])
            rows.append(("duplicate", "", float(info.duplicate_of is not None)))
            rows += weight_statistics(state, exact_max_dim=settings.exact_max_dim)
            if aliases is not None:
                rows += scratch.weight_change(state, aliases)
            aliases = scratch.save_weights(state)
            del state
            model.to(device)
            probe_rows, representations = probe_statistics(model, probe, batch_size=settings.batch_size)
            rows += probe_rows
            if previous_representations is not None:
                rows += _cka_rows("cka_previous", representations, previous_representations)
            scratch.save_representations(index, representations)
            previous_representations = representations
            if plan is not None:
                model.set_attn_implementation("sdpa")
                run = run_tasks(YuLanLM(model, tokenizer, batch_size=settings.batch_size), plan,
                                num_fewshot=settings.num_fewshot, limit=settings.task_limit, log_samples=False)
                rows += [(f"task/{name}", "", float(value)) for name, value in run.metrics().items()]
            del model
            info.seconds = round(time.time() - started, 3)
            rows_of.append(rows)
        last = scratch.representations(len(infos) - 1)
        for index, rows in enumerate(rows_of):
            rows += _cka_rows("cka_last", last if index == len(infos) - 1 else scratch.representations(index), last)
    finally:
        bar.close()
        scratch.close()
    records = [{"checkpoint": info.name, "step": info.step, "metric": metric, "layer": layer, "value": float(value)}
               for info, rows in zip(infos, rows_of) for metric, layer, value in rows]
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    table["step"] = table["step"].astype("Int64")
    table.attrs["checkpoints"] = [asdict(info) for info in infos]
    table.attrs["probe"] = probe.description if probe is not None else {}
    if out_dir is not None:
        write_outputs(table, out_dir, settings)
    return table


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def write_outputs(table: pd.DataFrame, out_dir: str | os.PathLike,
                  settings: DynamicsSettings | None = None) -> dict[str, Path]:
    """dynamics.csv (the tidy table), dynamics.json (checkpoints, probe, settings, rows), plots and report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / CSV_FILE, index=False)
    rows = [{key: _json_value(value) for key, value in row.items()} for row in table.to_dict(orient="records")]
    document = {"columns": list(COLUMNS), "checkpoints": table.attrs.get("checkpoints", []),
                "probe": table.attrs.get("probe", {}), "settings": asdict(settings) if settings else None,
                "rows": rows}
    (out / JSON_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    report = write_report(table, out, html_name=REPORT_FILE)
    return {"csv": out / CSV_FILE, "json": out / JSON_FILE, **report}

