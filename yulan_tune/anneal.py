"""Custom learning-rate annealing from a pre-annealing checkpoint: `AnnealConfig` + `AnnealRecipe`.

    from yulan_tune import AnnealRecipe
    recipe = AnnealRecipe.from_pretrained(
        "yulan-team/YuLan-Mini-Before-Annealing",        # or a local dir, or our own pretraining checkpoint, or "tiny"
        data={"my_domain.jsonl": 0.3, "replay.jsonl": 0.7}, tokens="2B", decay="1-sqrt",
        seq_len=28672, rope_theta=490000, output_dir="out/anneal")
    recipe.run()
    recipe.export_llama("out/anneal-llama")

What YuLan-Mini did in its annealing phases (yulan_reference.md 3.4, 4, 7.12, 7.14) and what this recipe does:

- Resume from the stable-phase checkpoint *with its AdamW moments and step* (`training/optim_state.py`: HF Trainer
  `optimizer.pt` or the DeepSpeed universal checkpoint `YuLan-Mini-Before-Annealing` ships, read without DeepSpeed).
  The moments are loaded by parameter name and every mismatch is reported; none is silently re-initialized.
- The LR decays from the checkpoint's LR (its full-rate group, 1e-2 for YuLan-Mini) to `end_lr_ratio` of it over the
  token budget, with the chosen shape (1-sqrt as YuLan-Mini, cosine, linear): at optimizer step t of the global count
  (t = S + k, S the checkpoint's step, k = 0..N-1) the multiplier is end + (1 - end) f(k / N), `WSDSchedule` with
  start_step S, no warmup, no stable window. muP groups keep their ratios: each group runs at peak * lr_scale
  (`training/mup.py`; matrices at 1/m_width).
- Data is a fresh weighted mix of the user's sets and replay data, packed like pretraining (`data/packing.py`: EOS
  between documents, fixed-length rows, position_ids restarting per document so attention stays within documents).
  The pre-annealing data position is neither replayed nor skipped through: only the model, optimizer state and step
  are taken from the checkpoint, never its dataloader state.
- Long context: the RoPE base switch (ABF, 10000 -> 490000 as YuLan's 28K model) and the new row length; activation
  checkpointing (`activation_checkpointing`) and a chunked cross-entropy (`loss_chunk_size`) that never materializes
  the [tokens, vocab] logits (at 28K x 99000 they would be 11 GB in fp32 per row).
- Branching: any number of decays (other data, shape, budget) from one checkpoint, each into its own output dir;
  the source is only read, never copied or written (`AnnealRecipe.branch`).
- Export: the annealed yulanmini model folded into the released plain-Llama form (`modeling/convert.py`), with
  tokenizer and chat template, loadable by `AutoModelForCausalLM`.

Distributed: single process and DDP. DeepSpeed ZeRO and FSDP re-create or re-shard the optimizer state after
`create_optimizer`, which would drop the loaded moments; the recipe refuses them rather than anneal with fresh ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, PreTrainedModel, TrainingArguments, default_data_collator

from yulan_tune.data.mixture import MixtureDataset
from yulan_tune.data.mixture import parse_token_count as mixture_token_count
from yulan_tune.data.packing import PackedDataset, prepare_packed_dataset
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM, causal_lm_loss_with_z_loss
from yulan_tune.paths import cache_home
from yulan_tune.training.mup import REFERENCE_BETAS, REFERENCE_EPS, REFERENCE_WEIGHT_DECAY
from yulan_tune.training.optim_state import (
    CheckpointOptimizerState,
    OptimizerStateReport,
    find_universal_checkpoint,
    hf_default_param_groups,
    load_optimizer_state,
    read_optimizer_checkpoint,
)
from yulan_tune.training.schedules import WSDSchedule, canonical_decay_shape, create_wsd_scheduler
from yulan_tune.training.trainer import YuLanTrainer, latest_complete_checkpoint

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"  # resolves to the tiny pre-annealing checkpoint (built on first use, see tiny_pre_annealing)
IGNORE_INDEX = -100


def parse_token_count(value: str | int | float) -> int:
    """'2B' -> 2_000_000_000, '500M', '1.5e6', 4096 (yulan_tune.data.mixture's parser; K/M/B/T suffixes). A float
    (YAML reads `1.5e6` as one) must be a whole number of tokens."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    count = mixture_token_count(value, "tokens")
    if count < 1:
        raise ValueError(f"tokens={value!r}: the budget must be at least one token")
    return count


def parse_data_mix(value: dict[str, float] | str | None) -> dict[str, float]:
    """The data mix {source: weight}: a mapping (YAML / Python), a JSON object string, or "a.jsonl=0.3,b.jsonl=0.7".
    Weights are normalized to sum to 1."""
    if value is None or value == "" or value == {}:
        raise ValueError("data: give at least one source, e.g. {'my_domain.jsonl': 0.3, 'replay.jsonl': 0.7}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [item.rsplit("=", 1) for item in text.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"data={value!r}: expected 'source=weight,source=weight' or a JSON object")
            value = {source.strip(): float(weight) for source, weight in pairs}
    if not isinstance(value, dict):
        raise ValueError(f"data: expected a mapping source -> weight, got {type(value).__name__}")
    weights = {str(source): float(weight) for source, weight in value.items()}
    bad = {source: weight for source, weight in weights.items() if not weight > 0 or not math.isfinite(weight)}
    if bad:
        raise ValueError(f"data: every weight must be a positive number, got {bad}")
    total = sum(weights.values())
    return {source: weight / total for source, weight in weights.items()}


@dataclass
class AnnealConfig(TrainingArguments):
    """transformers.TrainingArguments plus the annealing fields; settable from YAML and the command line.

    `learning_rate` and `lr_scheduler_type` are not used: the LR starts at the checkpoint's (or `peak_lr`) and follows
    the decay below. `max_steps` is derived from `tokens`."""

    model_name_or_path: str = field(
        default=TINY_MODEL, metadata={"help": "pre-annealing checkpoint: hub id, local dir (yulanmini weights with "
                                              "optimizer.pt or a global_step*_universal folder), or 'tiny'"})
    optimizer_state: str = field(
        default="auto", metadata={"help": "'auto': read it from the checkpoint (required there); a path to an HF "
                                          "checkpoint-N dir or DeepSpeed universal checkpoint; 'none': start AdamW "
                                          "with fresh moments (reported; not what annealing is meant for)"})
    data: dict[str, float] | str | None = field(
        default=None, metadata={"help": "data mix {source: weight}: JSONL / Parquet / text files or dirs, or dirs "
                                        "written by `yulan-tune prepare-data`; JSON or 'a.jsonl=0.3,b.jsonl=0.7'"})
    tokens: str = field(default="2B", metadata={"help": "token budget of the decay, e.g. '2B', '500M', 1e6"})
    decay: str = field(default="1-sqrt", metadata={"help": "decay shape: 1-sqrt (YuLan-Mini), cosine, cos2, linear"})
    end_lr_ratio: float = field(default=0.0, metadata={"help": "final LR as a fraction of the start LR (YuLan: 0)"})
    peak_lr: float | None = field(
        default=None, metadata={"help": "LR of the full-rate muP group at the start of the decay; default: the "
                                        "checkpoint's"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per packed row (YuLan's long-context anneal: 28672)"})
    rope_theta: float | None = field(
        default=None, metadata={"help": "new RoPE base (ABF; YuLan 10000 -> 490000); default: the checkpoint's"})
    text_field: str = field(default="text", metadata={"help": "JSONL / Parquet column holding the text"})
    packed_data_dir: str | None = field(
        default=None, metadata={"help": "where raw sources are tokenized and packed (default: $YULAN_TUNE_HOME/packed)"})
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "compute the LM loss over this many tokens at a time, recomputing their "
                                        "logits in backward (memory for long context); None: the model's loss"})
    load_master_weights: bool = field(
        default=True, metadata={"help": "start from the DeepSpeed universal checkpoint's fp32 master weights (the "
                                        "released safetensors are bf16 casts of them)"})
    strict_optimizer_state: bool = field(
        default=True, metadata={"help": "fail when a model parameter has no saved moments or a saved moment no "
                                        "parameter; false: load the matching part and report the rest"})
    hyperparameters_from_checkpoint: bool = field(
        default=True, metadata={"help": "take AdamW betas, eps and weight decay from the checkpoint's optimizer "
                                        "groups (else adam_beta1/2, adam_epsilon, weight_decay below)"})
    export_dir: str | None = field(default=None, metadata={"help": "after training, export the plain Llama here"})
    export_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "max_position_embeddings of the exported Llama (released YuLan-Mini: "
                                        "28723); default: the annealed model's"})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of the export: auto (the model's), bfloat16, "
                                                                "float32"})
    dtype: str | None = field(default=None, metadata={"help": "model dtype: float32 (default on CPU), bfloat16"})

    # YuLan-Mini's values for TrainingArguments fields (yulan_reference.md 3.1), used when the checkpoint has none
    weight_decay: float = REFERENCE_WEIGHT_DECAY
    adam_beta1: float = REFERENCE_BETAS[0]
    adam_beta2: float = REFERENCE_BETAS[1]
    adam_epsilon: float = REFERENCE_EPS
    max_grad_norm: float = 1.0
    # the pretraining Trainer's sampler seeks to the resumed step itself (training/trainer.py)
    ignore_data_skip: bool = True
    remove_unused_columns: bool = False

    def __post_init__(self):
        self.decay = canonical_decay_shape(self.decay)
        self.token_budget = parse_token_count(self.tokens)
        if self.data is not None:
            self.data = parse_data_mix(self.data)
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or None, got {self.loss_chunk_size}")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------------------------
# The checkpoint to anneal from


@dataclass
class AnnealSource:
    """Where the pre-annealing model and its optimizer state live (both only read)."""

    model_dir: Path
    optimizer_dir: Path | None  # HF checkpoint-N dir or DeepSpeed universal folder; None: fresh moments


def _latest_trainer_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint-N of a training output dir: the newest complete one when the run wrote completion
    records (PretrainRecipe's atomic checkpoints), else the highest-numbered one with an optimizer.pt."""
    complete = latest_complete_checkpoint(path)
    if complete is not None:
        return complete
    found = sorted((int(p.name.split("-")[1]), p) for p in path.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / "optimizer.pt").is_file())
    return found[-1][1] if found else None


def resolve_source(name_or_path: str, optimizer_state: str = "auto") -> AnnealSource:
    """Find the model weights and the optimizer state of a pre-annealing checkpoint.

    Accepted: "tiny"; an HF Trainer `checkpoint-N` dir; a training output dir holding `checkpoint-*` (the latest with
    an optimizer.pt is used); a model dir holding a DeepSpeed universal checkpoint (`latest_universal` /
    `global_step*_universal`, as YuLan-Mini-Before-Annealing); a `global_step*_universal` folder itself (weights from
    its parent); a hub id (downloaded with huggingface_hub, the universal checkpoint included)."""
    if name_or_path == TINY_MODEL:
        path = tiny_pre_annealing()
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            if name_or_path.startswith((".", "/", "~")):
                raise FileNotFoundError(f"{name_or_path}: no such directory")
            path = _download(name_or_path)
    if (path / "zero").is_dir() and not (path / "config.json").is_file():  # the universal folder itself
        model_dir = path.parent
    elif not (path / "config.json").is_file() and (latest := _latest_trainer_checkpoint(path)) is not None:
        model_dir = latest
    else:
        model_dir = path
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json with the model weights (looked in {model_dir}); pass a "
                                "model dir, an HF checkpoint-N dir or a training output dir")

    if optimizer_state == "none":
        optimizer_dir = None
    elif optimizer_state != "auto":
        optimizer_dir = Path(optimizer_state).expanduser()
        if not optimizer_dir.exists():
            raise FileNotFoundError(f"optimizer_state={optimizer_state!r}: no such file or directory")
    elif (model_dir / "optimizer.pt").is_file():
        optimizer_dir = model_dir
    elif (universal := find_universal_checkpoint(path if (path / "zero").is_dir() else model_dir)) is not None:
        optimizer_dir = universal
    else:
        raise FileNotFoundError(
            f"{model_dir}: no optimizer state (no optimizer.pt, no DeepSpeed universal checkpoint). Annealing is "
            "meant to continue the checkpoint's AdamW moments; a released model (e.g. a Llama export) has none. "
            "Point model_name_or_path at a pre-annealing checkpoint (YuLan-Mini-Before-Annealing, or a checkpoint-N "
            "of `yulan-tune pretrain`), pass optimizer_state=PATH, or optimizer_state='none' to start AdamW afresh."
        )
    return AnnealSource(model_dir, optimizer_dir)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # offline, missing repo, gated: one actionable line
        raise FileNotFoundError(
            f"could not load {repo_id!r}: no such local directory, and downloading it from the hub failed "
            f"({type(error).__name__}). Download it where the hub is reachable "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`, which includes its global_step*_universal "
            "optimizer states) and pass DIR."
        ) from error


# --------------------------------------------------------------------------------------------------------------------
# Data: a weighted mix of packed sources


def _packed_cache_dir(source: Path, tokenizer_dir: Path, seq_len: int, text_field: str, root: Path) -> Path:
    stat = source.stat()
    key = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, str(tokenizer_dir.resolve()), seq_len,
                      text_field])
    return root / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _bundled_documents(name: str) -> list[str]:
    from yulan_tune.data.corpus import bundled_corpus, math_documents, stdlib_documents

    documents = {"bundled:corpus": bundled_corpus, "bundled:math": math_documents, "bundled:stdlib": stdlib_documents}
    if name not in documents:
        raise ValueError(f"data source {name!r}: unknown bundled set; expected one of {sorted(documents)}")
    return documents[name]()


def pack_source(source: str, tokenizer_dir: Path, seq_len: int, *, text_field: str = "text",
                cache_root: Path | None = None) -> PackedDataset:
    """A packed dataset for one source: a `prepare-data` output dir is used as is (its row length must equal
    seq_len); raw files and dirs are tokenized and packed once into the cache (EOS between documents). The bundled
    sets ("bundled:corpus", "bundled:math", "bundled:stdlib", see data/corpus.py) are written out as JSONL first."""
    cache_root = cache_root or cache_home() / "packed"
    if source.startswith("bundled:"):
        bundled = cache_root / f"{source.replace(':', '-')}.jsonl"
        if not bundled.is_file():
            bundled.parent.mkdir(parents=True, exist_ok=True)
            staging = bundled.with_suffix(".tmp")
            staging.write_text("".join(json.dumps({"text": text}) + "\n" for text in _bundled_documents(source)))
            staging.replace(bundled)
        source, text_field = str(bundled), "text"
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    if (path / "manifest.json").is_file():
        packed = PackedDataset(path)
        if packed.seq_len != seq_len:
            raise ValueError(f"data source {source}: packed with seq_len {packed.seq_len}, the anneal uses seq_len "
                             f"{seq_len}; pack it again with `yulan-tune prepare-data --seq-len {seq_len}` or pass "
                             "the raw files")
        return packed
    out = _packed_cache_dir(path, tokenizer_dir, seq_len, text_field, cache_root)
    manifest = prepare_packed_dataset([path], tokenizer_dir, out, seq_len=seq_len, text_field=text_field,
                                      num_workers=1, progress=False)
    if manifest["rows"] == 0:
        raise ValueError(f"data source {source}: {manifest['tokenized_tokens']} tokens, less than one row of "
                         f"{seq_len}; add data or lower seq_len")
    return PackedDataset(out)


def mix_rows(weights: dict[str, float], num_rows: int) -> dict[str, int]:
    """Rows per source proportional to `weights`, summing to exactly `num_rows` (largest remainder)."""
    exact = {name: weight * num_rows for name, weight in weights.items()}
    rows = {name: math.floor(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - rows[n], reverse=True)[:num_rows - sum(rows.values())]:
        rows[name] += 1
    return rows


def stream_names(sources: list[str]) -> dict[str, str]:
    """The name each source's row stream is seeded with (data/mixture.py `stream_rows`): its file or directory name,
    so the data order depends on the seed and the data, not on where the files live; sources sharing a name get
    their position in the mix appended."""
    names = {source: Path(source).name or source for source in sources}
    counts = {name: list(names.values()).count(name) for name in names.values()}
    return {source: name if counts[name] == 1 else f"{name}#{i}" for i, (source, name) in enumerate(names.items())}


def mixture_composition(mixture: MixtureDataset, weights: dict[str, float],
                        names: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per source: weight, rows, tokens, available rows, passes over it (> 1: rows repeat; reported, not hidden).
    `names`: source -> its name in the mixture (default: the same)."""
    names = names or {source: source for source in weights}
    index = {name: i for i, name in enumerate(mixture.names)}
    result = {}
    for source, weight in weights.items():
        i = index[names[source]]
        rows = int((mixture.source_index == i).sum())
        result[source] = {"weight": weight, "rows": rows, "tokens": rows * mixture.seq_len,
                          "available_rows": len(mixture.sources[i]), "passes": mixture.passes[names[source]]}
    return result


# --------------------------------------------------------------------------------------------------------------------
# Loss: chunked cross-entropy for long rows


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    logits_multiplier: torch.Tensor | float,
    labels: torch.Tensor,
    z_loss: float,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The yulanmini loss (mean CE + z_loss * logsumexp^2, yulan_reference.md 1.3.5) computed `chunk_size` tokens at a
    time: logits = (h * multiplier) @ W^T of one chunk exist only inside a checkpointed function, so the forward keeps
    no [tokens, vocab] tensor and backward recomputes one chunk at a time. Equal to the model's own loss."""
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()

    def chunk_loss_sum(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(h * logits_multiplier, lm_head_weight)
        # num_items_in_batch=1 turns the model's loss function into a sum over the chunk's predicted tokens
        return causal_lm_loss_with_z_loss(logits, None, z_loss, num_items_in_batch=1, shift_labels=targets)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        targets = shift_labels[start:start + chunk_size]
        if bool((targets != IGNORE_INDEX).any()):
            total = total + checkpoint(chunk_loss_sum, hidden[start:start + chunk_size], targets, use_reentrant=False)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --------------------------------------------------------------------------------------------------------------------
# Trainer


class AnnealTrainer(YuLanTrainer):
    """The pretraining Trainer (muP AdamW from the TrainingArguments' LR / betas / eps / weight decay, WSD schedule,
    seekable data order) with three changes through its hooks: `create_optimizer` fills the AdamW with the
    checkpoint's moments and step; `create_scheduler` continues the checkpoint's step count; `compute_loss`
    optionally chunks the cross-entropy."""

    def __init__(self, *args: Any, optimizer_checkpoint: CheckpointOptimizerState | None,
                 loss_chunk_size: int | None = None, strict_optimizer_state: bool = True, **kwargs: Any) -> None:
        self.optimizer_checkpoint = optimizer_checkpoint
        self.loss_chunk_size = loss_chunk_size
        self.strict_optimizer_state = strict_optimizer_state
        self.optimizer_report: OptimizerStateReport | None = None
        self._final_hidden: dict[str, torch.Tensor] = {}
        if loss_chunk_size is not None:
            kwargs["compute_loss_func"] = self._chunked_loss
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "annealing loads AdamW moments into a torch optimizer; DeepSpeed ZeRO and FSDP rebuild or re-shard "
                "the optimizer state after create_optimizer, which would drop them. Run single-process or DDP "
                "(accelerate launch --multi_gpu)."
            )

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            super().create_optimizer(model)
            if self.optimizer_checkpoint is not None:
                saved = self.optimizer_checkpoint
                source_names = None if saved.named else hf_default_param_groups(self, model)
                self.optimizer_report = load_optimizer_state(saved, model, self.optimizer,
                                                             source_param_names=source_names,
                                                             strict=self.strict_optimizer_state)
                logger.info(self.optimizer_report.summary())
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            # The counter continues the checkpoint's global step S: the first optimizer step of the anneal is step S
            # and gets the schedule's value at S (the start LR), as the reference's LambdaLR over the global step.
            self.lr_scheduler = create_wsd_scheduler(optimizer or self.optimizer, self.schedule,
                                                     last_step=self.schedule.start_step - 1)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_chunk_size is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model computes logits for one position only; the loss comes from the final hidden states, captured by
        # a forward hook on the decoder and passed to compute_loss_func (self._chunked_loss) by Trainer.compute_loss.
        decoder = self.accelerator.unwrap_model(model).model
        handle = decoder.register_forward_hook(
            lambda module, args, output: self._final_hidden.__setitem__("hidden", output.last_hidden_state))
        try:
            return super().compute_loss(model, {**inputs, "logits_to_keep": 1}, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
            self._final_hidden.clear()

    def _chunked_loss(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        model: YuLanMiniForCausalLM = self.accelerator.unwrap_model(self.model)
        return chunked_causal_lm_loss(
            self._final_hidden["hidden"], model.lm_head.weight, model.config.logits_scale * model.lm_head_alpha,
            labels, model.config.z_loss, self.loss_chunk_size, num_items_in_batch)


# --------------------------------------------------------------------------------------------------------------------
# Recipe


class AnnealRecipe:
    """Load the pre-annealing checkpoint -> mix and pack the data -> decay with the checkpoint's optimizer state ->
    save (HF checkpoint with optimizer state, in yulanmini form) -> export to Llama."""

    def __init__(self, config: AnnealConfig, *, optimizer_checkpoint: CheckpointOptimizerState | None = None,
                 source: AnnealSource | None = None) -> None:
        if config.data is None:
            raise ValueError("AnnealConfig.data is required: the mix to anneal on, e.g. {'domain.jsonl': 0.3, "
                             "'replay.jsonl': 0.7}")
        self.config = config
        self.source = source or resolve_source(config.model_name_or_path, config.optimizer_state)
        self.tokenizer = load_tokenizer(self.source.model_dir)
        if optimizer_checkpoint is None and self.source.optimizer_dir is not None:
            optimizer_checkpoint = read_optimizer_checkpoint(self.source.optimizer_dir)
        self.optimizer_checkpoint = optimizer_checkpoint
        self.model: YuLanMiniForCausalLM | None = None
        self.trainer: AnnealTrainer | None = None
        self.dataset: MixtureDataset | None = None
        self.composition: dict[str, dict[str, Any]] | None = None

    # ---------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        data: dict[str, float] | str,
        output_dir: str,
        tokens: str | int = "2B",
        decay: str = "1-sqrt",
        seq_len: int = 4096,
        rope_theta: float | None = None,
        **config_fields: Any,
    ) -> AnnealRecipe:
        """The script API: any other AnnealConfig / TrainingArguments field can be passed as a keyword."""
        config = AnnealConfig(model_name_or_path=name_or_path, data=data, output_dir=output_dir, tokens=str(tokens),
                              decay=decay, seq_len=seq_len, rope_theta=rope_theta, **config_fields)
        return cls(config)

    def branch(self, output_dir: str, **overrides: Any) -> AnnealRecipe:
        """Another decay from the same checkpoint (other data / shape / budget / LR) into `output_dir`. The source is
        not copied: its optimizer state, already read into memory, is shared read-only (loading copies it into each
        branch's optimizer) and its weights are loaded again from the source dir."""
        if Path(output_dir).resolve() == Path(self.config.output_dir).resolve():
            raise ValueError(f"branch output_dir {output_dir} is this recipe's own output_dir; give each branch its own")
        if {"model_name_or_path", "optimizer_state"} & set(overrides):
            raise ValueError("a branch anneals the same checkpoint; build another AnnealRecipe for another source")
        if "tokens" in overrides:
            overrides["tokens"] = str(overrides["tokens"])
        config = dataclasses.replace(self.config, output_dir=output_dir, **overrides)
        return AnnealRecipe(config, optimizer_checkpoint=self.optimizer_checkpoint, source=self.source)

    # ---------------------------------------------------------------------------------------------- pieces

    @property
    def start_step(self) -> int:
        """S: the optimizer step of the checkpoint, where the decay starts (0 with fresh moments)."""
        return self.optimizer_checkpoint.global_step if self.optimizer_checkpoint is not None else 0

    @property
    def peak_lr(self) -> float:
        """LR of the full-rate muP group at the first anneal step: `peak_lr`, else the checkpoint's."""
        if self.config.peak_lr is not None:
            return self.config.peak_lr
        if self.optimizer_checkpoint is None:
            raise ValueError("optimizer_state='none' has no checkpoint LR to decay from: set peak_lr")
        return self.optimizer_checkpoint.lr

    @property
    def world_size(self) -> int:
        return max(self.config.world_size, 1)

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size * c.seq_len

    @property
    def decay_steps(self) -> int:
        """N = ceil(token budget / tokens per optimizer step)."""
        return -(-self.config.token_budget // self.tokens_per_step)

    @property
    def schedule(self) -> WSDSchedule:
        return WSDSchedule(warmup_steps=0, stable_steps=0, decay_steps=self.decay_steps, decay_shape=self.config.decay,
                           start_step=self.start_step, end_factor=self.config.end_lr_ratio)

    def apply_optimizer_settings(self) -> None:
        """Put the anneal's AdamW settings into the TrainingArguments the Trainer builds its optimizer from: the LR
        of the full-rate group (muP groups scale it), and the checkpoint's betas, eps and weight decay (taken from its
        full-rate group; YuLan-Mini: (0.9, 0.95), 1e-15, 0.1) unless hyperparameters_from_checkpoint is off."""
        c, saved = self.config, self.optimizer_checkpoint
        c.learning_rate = self.peak_lr
        if c.hyperparameters_from_checkpoint and saved is not None:
            group = max(saved.param_groups, key=lambda g: float(g["lr"]) / float(g.get("lr_scale", 1.0)))
            if "betas" in group:
                c.adam_beta1, c.adam_beta2 = (float(beta) for beta in group["betas"])
            c.adam_epsilon = float(group.get("eps", c.adam_epsilon))
            c.weight_decay = float(group.get("weight_decay", c.weight_decay))

    def load_model(self) -> YuLanMiniForCausalLM:
        """The checkpoint's yulanmini model, with the RoPE base and positions switched for long context (ABF)."""
        c = self.config
        model_config = AutoConfig.from_pretrained(self.source.model_dir)
        if model_config.model_type != "yulanmini":
            raise ValueError(
                f"{self.source.model_dir}: model_type {model_config.model_type!r}; annealing runs on the yulanmini "
                "training form (muP groups, WeSaR scalars) that the optimizer moments belong to. A Llama export has "
                "no optimizer state; convert it with `yulan-tune convert --to yulanmini` only for a fresh-moment "
                "anneal (optimizer_state='none')."
            )
        if c.rope_theta is not None:
            # transformers 5 reads RoPE settings from config.rope_parameters (stack_notes.md: assigning rope_theta
            # after construction is ignored), so the dict itself is replaced before the model is built.
            model_config.rope_parameters = {**(model_config.rope_parameters or {"rope_type": "default"}),
                                            "rope_theta": float(c.rope_theta)}
        model_config.max_position_embeddings = max(model_config.max_position_embeddings, c.seq_len)
        model_config.num_steps_trained_before_this_epoch = self.start_step  # reference bookkeeping (3.5)
        dtype = c.dtype or ("bfloat16" if c.bf16 else "float32")
        model = load_model(self.source.model_dir, dtype=dtype, config=model_config)
        if not isinstance(model, YuLanMiniForCausalLM):
            raise TypeError(f"expected a YuLanMiniForCausalLM, got {type(model).__name__}")
        saved = self.optimizer_checkpoint
        if c.load_master_weights and saved is not None and saved.format == "deepspeed_universal":
            self._load_master_weights(model, saved)
        return model

    def _load_master_weights(self, model: PreTrainedModel, saved: CheckpointOptimizerState) -> None:
        params = dict(model.named_parameters())
        copied = 0
        with torch.no_grad():
            for name, state in saved.params.items():
                if state.master_weight is not None and name in params:
                    params[name].copy_(state.master_weight.reshape(params[name].shape))
                    copied += 1
        logger.info("copied %d fp32 master weights from %s", copied, saved.source)

    def build_dataset(self) -> MixtureDataset:
        """The data mix as the pretraining mixture: round(weight x rows) rows of each source in one seeded order;
        a source smaller than its share repeats (counted in `composition`)."""
        c = self.config
        root = Path(c.packed_data_dir) if c.packed_data_dir else None
        names = stream_names(list(c.data))
        sources = {names[source]: pack_source(source, self.source.model_dir, c.seq_len, text_field=c.text_field,
                                              cache_root=root) for source in c.data}
        num_rows = self.decay_steps * c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size
        rows = mix_rows({names[source]: weight for source, weight in c.data.items()}, num_rows)
        mixture = MixtureDataset(sources, rows, seed=c.seed, shuffle_seed=c.seed)
        self.composition = mixture_composition(mixture, c.data, names)
        for name, part in self.composition.items():
            if part["passes"] > 1:
                logger.warning("data source %s: %d rows requested, %d available: repeated %.2f times", name,
                               part["rows"], part["available_rows"], part["passes"])
        return mixture

    def build_trainer(self) -> AnnealTrainer:
        c = self.config
        self.dataset = self.build_dataset()
        self.model = self.load_model()
        c.max_steps = self.decay_steps  # the budget, not epochs, ends the run
        self.apply_optimizer_settings()
        self.trainer = AnnealTrainer(
            model=self.model,
            args=c,
            train_dataset=self.dataset,
            data_collator=default_data_collator,  # input_ids, labels, position_ids; no attention_mask (packed rows)
            processing_class=self.tokenizer,
            schedule=self.schedule,
            optimizer_checkpoint=self.optimizer_checkpoint,
            loss_chunk_size=c.loss_chunk_size,
            strict_optimizer_state=c.strict_optimizer_state,
        )
        return self.trainer

    # ---------------------------------------------------------------------------------------------- run / export

    def plan(self) -> dict[str, Any]:
        """What the run will do, written to output_dir/anneal_plan.json."""
        c, saved = self.config, self.optimizer_checkpoint
        return {
            "source_model": str(self.source.model_dir),
            "source_optimizer_state": str(self.source.optimizer_dir) if self.source.optimizer_dir else None,
            "optimizer_state_format": saved.format if saved else None,
            "start_step": self.start_step,
            "decay_steps": self.decay_steps,
            "end_step": self.start_step + self.decay_steps,
            "tokens_per_step": self.tokens_per_step,
            "tokens": self.decay_steps * self.tokens_per_step,
            "requested_tokens": c.token_budget,
            "decay": c.decay,
            "peak_lr": self.peak_lr,
            "end_lr_ratio": c.end_lr_ratio,
            "checkpoint_group_lrs": saved.group_lrs if saved else None,
            "seq_len": c.seq_len,
            "rope_theta": c.rope_theta,
            "data": self.composition if self.composition is not None else c.data,
        }

    def run(self) -> dict[str, Any]:
        trainer = self.trainer or self.build_trainer()
        out = Path(self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if trainer.is_world_process_zero():
            (out / "anneal_plan.json").write_text(json.dumps(self.plan(), indent=2))
        result = trainer.train(resume_from_checkpoint=self.config.resume_from_checkpoint)
        trainer.save_model(str(out))
        metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
                                   "start_step": self.start_step, "end_step": self.start_step + trainer.state.global_step}
        report = trainer.optimizer_report
        if report is not None:
            metrics["optimizer_state"] = {"loaded": len(report.loaded), "missing": report.missing,
                                          "unexpected": report.unexpected, "step": report.step,
                                          "format": report.format}
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            (out / "yulan_tune_metrics.json").write_text(json.dumps(metrics, indent=2))
            if report is not None:
                (out / "optimizer_state_report.txt").write_text(report.summary() + "\n")
            if self.config.export_dir:
                self.export_llama(self.config.export_dir)
        return metrics

    def export_llama(self, out_dir: str | os.PathLike) -> Path:
        """The annealed model in the released plain-Llama form (untied head, RoPE base and max positions of the
        anneal), with tokenizer and chat template; loadable with AutoModelForCausalLM."""
        from yulan_tune.modeling.convert import to_llama

        model = self.trainer.model if self.trainer is not None else self.model
        if model is None:  # a finished run in another process: read what it saved
            model = YuLanMiniForCausalLM.from_pretrained(self.config.output_dir)
        dtype = None if self.config.export_dtype == "auto" else getattr(torch, self.config.export_dtype)
        llama = to_llama(model, dtype=dtype)
        if self.config.export_max_position_embeddings is not None:
            llama.config.max_position_embeddings = self.config.export_max_position_embeddings
        llama.config.pad_token_id = self.tokenizer.pad_token_id
        out = Path(out_dir)
        llama.save_pretrained(out)  # safetensors
        self.tokenizer.save_pretrained(out)  # tokenizer files + chat template
        return out


# --------------------------------------------------------------------------------------------------------------------
# The tiny pre-annealing checkpoint (the embedded default)


TINY_PRE_ANNEALING_VERSION = "1"
TINY_STABLE_STEPS = 60
TINY_STABLE_LR = 1e-2  # YuLan-Mini's stable-phase peak (yulan_reference.md 3.1); hidden matrices at 1e-2 / m_width
TINY_ROPE_THETA = 10000.0  # the 4K stage's base (1.1), so that the anneal's ABF switch to 490000 is a real switch


def tiny_pre_annealing(out_dir: str | os.PathLike | None = None, *, tokenizer_dir: str | os.PathLike | None = None,
                       corpus: str = "bundled:corpus", steps: int = TINY_STABLE_STEPS, lr: float = TINY_STABLE_LR,
                       seq_len: int = 256, batch_size: int = 8, seed: int = 0, force: bool = False,
                       **model_config: Any) -> Path:
    """A tiny stable-phase checkpoint to anneal from, built on first use by our own pretraining recipe
    (`PretrainRecipe`: a yulanmini of the tiny YuLan's shape from a muP init, muP AdamW, z-loss, a short warmup and
    then a constant LR, no decay) on `corpus`; returns its last `checkpoint-N` (weights, optimizer state, tokenizer).
    Cached under $YULAN_TUNE_HOME unless `out_dir`. `tokenizer_dir`: the tiny tokenizer (default: trained here);
    `model_config`: overrides of the tiny shape (tests use a narrower model)."""
    from yulan_tune.modeling.tiny import TINY_SHAPE, build_tiny_tokenizer
    from yulan_tune.pretrain import PretrainConfig, PretrainRecipe

    root = Path(out_dir) if out_dir is not None else cache_home() / f"tiny-pre-annealing-v{TINY_PRE_ANNEALING_VERSION}"
    run_dir = root / "run"
    checkpoint_dir = run_dir / f"checkpoint-{steps}"
    if latest_complete_checkpoint(run_dir) == checkpoint_dir and not force:
        return checkpoint_dir
    if force:
        shutil.rmtree(run_dir, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = root / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            build_tiny_tokenizer(tokenizer_dir)
    packed = pack_source(corpus, Path(tokenizer_dir), seq_len, cache_root=root / "packed")
    curriculum = root / "curriculum.yaml"  # one stable phase of exactly `steps` steps; JSON is valid YAML
    curriculum.write_text(json.dumps({"seq_len": seq_len, "datasets": {"stable": str(packed.path)},
                                      "phases": [{"name": "stable", "tokens": {"stable": steps * batch_size * seq_len}}]}))
    shape = {key: TINY_SHAPE[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size")}
    config = PretrainConfig(
        output_dir=str(run_dir), curriculum=str(curriculum), tokenizer=str(tokenizer_dir), seq_len=seq_len, seed=seed,
        model_config={**shape, "rope_parameters": {"rope_type": "default", "rope_theta": TINY_ROPE_THETA},
                      "max_position_embeddings": 4096, **model_config},
        per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=max(steps // 6, 1), decay_steps=0,
        save_steps=steps, keep_last_checkpoints=1, monitor_every_steps=0, logging_steps=max(steps // 6, 1),
        report_to="none", export_llama=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    PretrainRecipe(config).run()
    return checkpoint_dir


# --------------------------------------------------------------------------------------------------------------------
# Command line


def parse_config(argv: list[str] | None = None) -> AnnealConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's parser (as the other recipes)."""
    import trl

    (config,) = trl.TrlParser((AnnealConfig,)).parse_args_and_config(argv)
    return config


def anneal_main(argv: list[str] | None = None) -> int:
    """`yulan-tune anneal --config recipes/configs/anneal_tiny.yaml [--field value ...]`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = AnnealRecipe(parse_config(argv)).run()
    print("anneal: " + json.dumps(metrics))
    return 0
