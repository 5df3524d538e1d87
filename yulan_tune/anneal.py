"""Custom learning-rate annealing from a pre-annealing checkpoint: `AnnealConfig` + `AnnealRecipe`.

    from yulan_tune import AnnealRecipe
    recipe = AnnealRecipe.from_pretrained(
        "yulan-team/YuLan-Mini-Before-Annealing",        # or a local dir, or our own pretraining checkpoint, or "tiny"
        data={"my_domain.jsonl": 0.3, "replay.jsonl": 0.7}, tokens="2B", decay="1-sqrt",
        seq_len=28672, rope_theta=490000, output_dir="out/anneal")
    recipe.run()
    recipe.export_llama("out/anneal-llama")

What YuLan-Mini did in its annealing phases (docs/yulan_reference.md 3.4, 4, 7.12, 7.14) and what this recipe does:

- Resume from the stable-phase checkpoint *with its AdamW moments and step* (`training/optim_state.py`: HF Trainer
  `optimizer.pt` or the DeepSpeed universal checkpoint `YuLan-Mini-Before-Annealing` ships, read without DeepSpeed).
  The moments are loaded by parameter name and every mismatch is reported; none is silently re-initialized.
- The LR decays from the checkpoint's LR (its full-rate group, 1e-2 for YuLan-Mini) to `end_lr_factor` of it over the
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

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, TrainingArguments, default_data_collator

from yulan_tune.console import write_metrics
from yulan_tune.data.curriculum import parse_token_count
from yulan_tune.data.mixture import MixtureDataset, largest_remainder, mixture_composition, parse_data_mix, stream_names
from yulan_tune.data.records import check_txt_split
from yulan_tune.data.sources import pack_source
from yulan_tune.evaluation.during_training import HarnessEvalArguments, attach_harness_eval
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.modeling.convert import to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM
from yulan_tune.tiny import resolve_tiny
from yulan_tune.training.callbacks import TrainingProgress, use_console_progress
from yulan_tune.training.checkpoints import AnnealSource, SaveAtSteps, check_keep_steps, resolve_source
from yulan_tune.training.mup import REFERENCE_BETAS, REFERENCE_EPS, REFERENCE_WEIGHT_DECAY
from yulan_tune.training.optim_state import CheckpointOptimizerState, read_optimizer_checkpoint
from yulan_tune.training.schedules import WSDSchedule, canonical_decay_shape
from yulan_tune.training.trainer import AnnealTrainer

logger = logging.getLogger(__name__)


@dataclass
class AnnealConfig(TrainingArguments, HarnessEvalArguments):
    """transformers.TrainingArguments plus the annealing fields; settable from YAML and the command line.

    `learning_rate` and `lr_scheduler_type` are not used: the LR starts at the checkpoint's (or `peak_lr`) and follows
    the decay below. `max_steps` is derived from `tokens`."""

    model_name_or_path: str = field(
        default="tiny", metadata={"help": "pre-annealing checkpoint: hub id, local dir (yulanmini weights with "
                                              "optimizer.pt or a global_step*_universal folder), or 'tiny'"})
    optimizer_state: str = field(
        default="auto", metadata={"help": "'auto': read it from the checkpoint (required there); a path to an HF "
                                          "checkpoint-N dir or DeepSpeed universal checkpoint; 'none': start AdamW "
                                          "with fresh moments (reported; not what annealing is meant for)"})
    optimizer_state_step: int | None = field(
        default=None, metadata={"help": "the global_step<N>_universal folder to read when the checkpoint holds "
                                        "several (yulan-team/YuLan-Mini-Before-Annealing: 243198, the default for "
                                        "that hub id); unset: the only folder, or the one the weights' recorded "
                                        "step agrees with, else the run refuses"})
    data: dict[str, float] | str | None = field(
        default=None, metadata={"help": "data mix {source: weight}: JSONL / Parquet / text files or dirs, or dirs "
                                        "written by `yulan-tune prepare-data`; JSON or 'a.jsonl=0.3,b.jsonl=0.7'"})
    tokens: str = field(default="2B", metadata={"help": "token budget of the decay, e.g. '2B', '500M', 1e6"})
    decay: str = field(default="1-sqrt", metadata={"help": "decay shape: 1-sqrt (YuLan-Mini), cosine, cos2, linear"})
    end_lr_factor: float = field(default=0.0, metadata={"help": "final LR as a fraction of the start LR (YuLan: 0)"})
    peak_lr: float | None = field(
        default=None, metadata={"help": "LR of the full-rate muP group at the start of the decay; default: the "
                                        "checkpoint's"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per packed row (YuLan's long-context anneal: 28672)"})
    rope_theta: float | None = field(
        default=None, metadata={"help": "new RoPE base (ABF; YuLan 10000 -> 490000); default: the checkpoint's"})
    text_field: str = field(default="text", metadata={"help": "JSONL / Parquet column holding the text"})
    txt_split: str = field(default="file", metadata={
        "help": "plain-text sources: one document per file, or 'blank_lines': documents separated by blank lines"})
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
    keep_checkpoint_steps: list[int] | None = field(
        default=None, metadata={"help": "also save a checkpoint at each of these anneal steps (checkpoint-N, N "
                                        "counted from the anneal's start; the model's step is the source's + N), "
                                        "a series for `yulan-tune dynamics`; leave save_total_limit unset"})
    export_dir: str | None = field(default=None, metadata={"help": "after training, export the plain Llama here"})
    export_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "max_position_embeddings of the exported Llama (released YuLan-Mini: "
                                        "28723); default: the annealed model's"})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of the export: auto (the model's), bfloat16, "
                                                                "float32"})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype of the weights the optimizer updates: float32 (default; with bf16: true the forward and backward "
                "run in bf16 autocast over fp32 master weights, as YuLan-Mini's run), or bfloat16 (no fp32 copy: less "
                "memory, and updates smaller than bf16's resolution are lost). With a checkpoint's optimizer state, "
                "bfloat16 is the compute dtype only: weights and moments stay float32 (DeepSpeed kept both in fp32) "
                "and the forward runs in bf16 autocast"})

    # YuLan-Mini's values for TrainingArguments fields (docs/yulan_reference.md 3.1), used when the checkpoint has none
    weight_decay: float = REFERENCE_WEIGHT_DECAY
    adam_beta1: float = REFERENCE_BETAS[0]
    adam_beta2: float = REFERENCE_BETAS[1]
    adam_epsilon: float = REFERENCE_EPS
    max_grad_norm: float = 1.0
    # the pretraining Trainer's sampler seeks to the resumed step itself (training/trainer.py)
    ignore_data_skip: bool = True
    remove_unused_columns: bool = False

    def __post_init__(self):
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch warns on every dataloader otherwise
        self.decay = canonical_decay_shape(self.decay)
        check_txt_split(self.txt_split)
        self.token_budget = parse_token_count(self.tokens, "tokens")
        if self.token_budget < 1:
            raise ValueError(f"tokens={self.tokens!r}: the budget must be at least one token")
        if self.data is not None:
            self.data = parse_data_mix(self.data)
        if not 0.0 <= self.end_lr_factor <= 1.0:
            raise ValueError(f"end_lr_factor must be in [0, 1], got {self.end_lr_factor}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        self.keep_checkpoint_steps = check_keep_steps(self.keep_checkpoint_steps) or None
        if self.keep_checkpoint_steps and self.save_total_limit is not None:
            raise ValueError("keep_checkpoint_steps with save_total_limit: the Trainer's rotation would delete the "
                             "kept checkpoints; leave save_total_limit unset")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or None, got {self.loss_chunk_size}")
        super().__post_init__()


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
        self.source = source or resolve_source(resolve_tiny(config.model_name_or_path, "pre_annealing"),
                                               config.optimizer_state, config.optimizer_state_step)
        self.tokenizer = load_tokenizer(self.source.model_dir)
        if optimizer_checkpoint is None and self.source.optimizer_dir is not None:
            optimizer_checkpoint = read_optimizer_checkpoint(self.source.optimizer_dir,
                                                             step=self.source.optimizer_step)
            if self.source.optimizer_choice:
                optimizer_checkpoint.choice = self.source.optimizer_choice
            logger.info("optimizer state: %s", self.checkpoint_line(optimizer_checkpoint))
        self.optimizer_checkpoint = optimizer_checkpoint
        self.model: YuLanMiniForCausalLM | None = None
        self.trainer: AnnealTrainer | None = None
        self.dataset: MixtureDataset | None = None
        self.composition: dict[str, dict[str, Any]] | None = None
        self.masters_loaded = 0

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
        if {"model_name_or_path", "optimizer_state", "optimizer_state_step"} & set(overrides):
            raise ValueError("a branch anneals the same checkpoint; build another AnnealRecipe for another source")
        if "tokens" in overrides:
            overrides["tokens"] = str(overrides["tokens"])
        config = dataclasses.replace(self.config, output_dir=output_dir, **overrides)
        return AnnealRecipe(config, optimizer_checkpoint=self.optimizer_checkpoint, source=self.source)

    # ---------------------------------------------------------------------------------------------- pieces

    @staticmethod
    def checkpoint_line(saved: CheckpointOptimizerState) -> str:
        """One line on the checkpoint the decay starts from: folder, step, LR and why that folder."""
        return (f"{saved.source} ({saved.format}), step {saved.global_step}, LR {saved.lr:g}"
                + (f", chosen as {saved.choice}" if saved.choice else ""))

    @property
    def param_dtype(self) -> str:
        """dtype of the parameters the optimizer updates: float32 whenever a checkpoint's moments are loaded (they and
        the masters are fp32 in DeepSpeed's bf16 mode; torch would round them to a bf16 parameter's dtype)."""
        if self.optimizer_checkpoint is not None:
            return "float32"
        return self.config.dtype or "float32"

    @property
    def bf16_autocast(self) -> bool:
        """bf16 forward and backward over the fp32 parameters: `bf16: true`, or `dtype: bfloat16` with loaded
        moments (bf16 is then the compute dtype)."""
        return bool(self.config.bf16) or (self.config.dtype == "bfloat16" and self.param_dtype == "float32")

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
                           start_step=self.start_step, end_lr_factor=self.config.end_lr_factor)

    def training_args(self) -> AnnealConfig:
        """A copy of the config with what the Trainer builds its optimizer and stops from: the token budget's steps,
        the LR of the full-rate group (muP groups scale it), and the checkpoint's betas, eps and weight decay (taken
        from its full-rate group; YuLan-Mini: (0.9, 0.95), 1e-15, 0.1) unless hyperparameters_from_checkpoint is off.
        The config itself is not changed (a branch copies what the user gave)."""
        args, saved = copy.copy(self.config), self.optimizer_checkpoint
        args.max_steps = self.decay_steps  # the budget, not epochs, ends the run
        args.learning_rate = self.peak_lr
        args.bf16 = self.bf16_autocast
        if args.hyperparameters_from_checkpoint and saved is not None:
            group = max(saved.param_groups, key=lambda g: float(g["lr"]) / float(g.get("lr_scale", 1.0)))
            if "betas" in group:
                args.adam_beta1, args.adam_beta2 = (float(beta) for beta in group["betas"])
            args.adam_epsilon = float(group.get("eps", args.adam_epsilon))
            args.weight_decay = float(group.get("weight_decay", args.weight_decay))
        return args

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
            # transformers 5 reads RoPE settings from config.rope_parameters (docs/stack_notes.md: assigning rope_theta
            # after construction is ignored), so the dict itself is replaced before the model is built.
            model_config.rope_parameters = {**(model_config.rope_parameters or {"rope_type": "default"}),
                                            "rope_theta": float(c.rope_theta)}
        model_config.max_position_embeddings = max(model_config.max_position_embeddings, c.seq_len)
        model_config.num_steps_trained_before_this_epoch = self.start_step  # reference bookkeeping (3.5)
        dtype = self.param_dtype
        saved = self.optimizer_checkpoint
        copies_masters = c.load_master_weights and saved is not None and saved.format == "deepspeed_universal"
        if c.dtype not in (None, dtype):
            logger.info("dtype %s with the checkpoint's optimizer state: parameters and moments stay %s, the forward "
                        "runs in %s autocast", c.dtype, dtype, c.dtype)
        model = load_model(self.source.model_dir, dtype=dtype, config=model_config)
        if not isinstance(model, YuLanMiniForCausalLM):
            raise TypeError(f"expected a YuLanMiniForCausalLM, got {type(model).__name__}")
        if copies_masters:
            self._load_master_weights(model, saved)
        return model

    def _load_master_weights(self, model: PreTrainedModel, saved: CheckpointOptimizerState) -> None:
        """Every parameter from the checkpoint's fp32 master weight (the released safetensors are bf16 casts of
        them); a parameter without one is an error, not a silent bf16 start."""
        params = dict(model.named_parameters())  # tied parameters once (their aliases' folders hold no master)
        masters = {name: state.master_weight for name, state in saved.params.items()
                   if state.master_weight is not None and name in params}
        missing = sorted(set(params) - set(masters))
        if missing:
            raise ValueError(f"{saved.source}: fp32 master weights for {len(masters)} of {len(params)} parameters; "
                             f"none for {missing[:3]}{' ...' if len(missing) > 3 else ''}. Set load_master_weights: "
                             "false to start from the model's own weights")
        with torch.no_grad():
            for name, master in masters.items():
                if params[name].dtype != master.dtype:
                    raise ValueError(f"{saved.source}: the {master.dtype} master of {name!r} would be cast to the "
                                     f"parameter's {params[name].dtype}")
                params[name].copy_(master.reshape(params[name].shape))
        self.masters_loaded = len(masters)
        logger.info("copied %d fp32 master weights from %s", len(masters), saved.source)

    def build_dataset(self) -> MixtureDataset:
        """The data mix as the pretraining mixture: round(weight x rows) rows of each source in one seeded order;
        a source smaller than its share repeats (counted in `composition`)."""
        c = self.config
        root = Path(c.packed_data_dir) if c.packed_data_dir else None
        names = stream_names(list(c.data))
        sources = {names[source]: pack_source(source, self.source.model_dir, c.seq_len, text_field=c.text_field,
                                              txt_split=c.txt_split, cache_root=root) for source in c.data}
        num_rows = self.decay_steps * c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size
        rows = largest_remainder(num_rows, {names[source]: weight for source, weight in c.data.items()})
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
        self.trainer = AnnealTrainer(
            model=self.model,
            args=self.training_args(),
            train_dataset=self.dataset,
            data_collator=default_data_collator,  # input_ids, labels, position_ids; no attention_mask (packed rows)
            processing_class=self.tokenizer,
            schedule=self.schedule,
            optimizer_checkpoint=self.optimizer_checkpoint,
            loss_chunk_size=c.loss_chunk_size,
            strict_optimizer_state=c.strict_optimizer_state,
            callbacks=[SaveAtSteps(c.keep_checkpoint_steps)] if c.keep_checkpoint_steps else None,
        )
        attach_harness_eval(self.trainer, c)
        return use_console_progress(self.trainer, TrainingProgress("anneal"))

    # ---------------------------------------------------------------------------------------------- run / export

    def plan(self) -> dict[str, Any]:
        """What the run will do, written to output_dir/anneal_plan.json."""
        c, saved = self.config, self.optimizer_checkpoint
        return {
            "source_model": str(self.source.model_dir),
            "source_optimizer_state": str(saved.source) if saved else None,
            "optimizer_state_format": saved.format if saved else None,
            "optimizer_state_choice": saved.choice if saved else None,
            "checkpoint_step": saved.global_step if saved else None,
            "checkpoint_lr": saved.lr if saved else None,
            "checkpoint_notes": saved.notes if saved else [],
            "param_dtype": self.param_dtype,
            "bf16_autocast": self.bf16_autocast,
            "start_step": self.start_step,
            "decay_steps": self.decay_steps,
            "end_step": self.start_step + self.decay_steps,
            "tokens_per_step": self.tokens_per_step,
            "tokens": self.decay_steps * self.tokens_per_step,
            "requested_tokens": c.token_budget,
            "decay": c.decay,
            "peak_lr": self.peak_lr,
            "end_lr_factor": c.end_lr_factor,
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
                                          "format": report.format, "source": str(report.source),
                                          "choice": self.optimizer_checkpoint.choice,
                                          "masters_loaded": self.masters_loaded,
                                          "lr": self.optimizer_checkpoint.lr}
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            write_metrics(out, metrics)
            if report is not None:
                (out / "optimizer_state_report.txt").write_text(report.summary() + "\n")
            if self.config.export_dir:
                self.export_llama(self.config.export_dir)
        return metrics

    def export_llama(self, out_dir: str | os.PathLike) -> Path:
        """The annealed model in the released plain-Llama form (untied head, RoPE base and max positions of the
        anneal), with tokenizer and chat template; loadable with AutoModelForCausalLM."""
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


def parse_config(argv: list[str] | None = None) -> AnnealConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's parser (as the other recipes)."""
    import trl

    (config,) = trl.TrlParser((AnnealConfig,)).parse_args_and_config(argv)
    return config
