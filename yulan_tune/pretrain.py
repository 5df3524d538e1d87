"""Pretraining the YuLan way: a yulanmini model from scratch, curriculum phases from data-mix files, muP AdamW,
a WSD schedule, z-loss, the hidden-state monitor, and exact resume (docs/yulan_reference.md 1-5).

    from yulan_tune import PretrainConfig, PretrainRecipe
    PretrainRecipe(PretrainConfig(output_dir=..., curriculum=..., tokenizer=..., model_config={...})).run()

    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/pretrain.py --config recipes/configs/...yaml

How a run proceeds (`PretrainRecipe.run`):
1. Plan every curriculum phase: a token budget per dataset -> rows of packed data -> optimizer steps
   (`yulan_tune.data.curriculum.plan_phases`). The WSD schedule spans all phases of the curriculum, in global steps.
2. Find where the output directory stands: incomplete checkpoints (a kill while saving) are removed, the newest
   complete one is the resume point; its completion record holds the curriculum position (phase, first step).
3. Run each remaining phase as one `YuLanTrainer.train()` on that phase's `MixtureDataset`. A phase resumes from
   the latest checkpoint; a new phase starts from the last checkpoint of the previous one (weights, optimizer state,
   LR schedule position and RNG come back; the data order seeks to the step). The last checkpoint of every phase is
   kept by rotation (`keep: true` in its record), as is a checkpoint at each of `keep_checkpoint_steps` (saved
   there in addition to `save_steps`): the series `yulan-tune dynamics` studies.
4. After the last phase, save `final/` (yulanmini) and, with `export_llama`, `final-llama/` (the released form).

Deliberate choices: training uses `position_ids` that restart per document, so attention stays inside documents
(yulanmini.py); the YuLan reference ran RoPE over whole rows (1.3 item 6). Weight decay also applies to biases,
norms and WeSaR scalars, as the reference's grouping did (3.2); `decay_vectors: false` turns that off.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from yulan_tune.console import write_metrics
from yulan_tune.data.bundled import prepare_bundled_corpus
from yulan_tune.data.curriculum import (
    Curriculum,
    CurriculumError,
    PhasePlan,
    load_curriculum,
    parse_token_count,
    plan_phases,
    token_budget_to_steps,
)
from yulan_tune.data.mixture import open_phase
from yulan_tune.data.packed import PackedDataset
from yulan_tune.evaluation.during_training import HarnessEvalArguments, attach_harness_eval
from yulan_tune.modeling.convert import to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM
from yulan_tune.training.callbacks import TrainingProgress, use_console_progress
from yulan_tune.training.checkpoints import (
    AtomicCheckpointCallback,
    SaveAtSteps,
    check_keep_steps,
    latest_complete_checkpoint,
    read_checkpoint_record,
    remove_incomplete_checkpoints,
)
from yulan_tune.training.monitor import HiddenStateMonitor
from yulan_tune.training.mup import REFERENCE_BETAS, REFERENCE_EPS, REFERENCE_WEIGHT_DECAY
from yulan_tune.training.schedules import WSDSchedule
from yulan_tune.training.trainer import YuLanTrainer

logger = logging.getLogger(__name__)

BUNDLED_DATASETS = ("stdlib", "math", "stdlib-heldout", "math-test")


@dataclass
class PretrainConfig(TrainingArguments, HarnessEvalArguments):
    """TrainingArguments plus the pretraining recipe's fields. Defaults are YuLan-Mini's (docs/yulan_reference.md 3.1):
    peak LR 1e-2 (hidden matrices get lr / m_width through the muP groups), AdamW (0.9, 0.95), eps 1e-15, weight decay
    0.1, gradient clipping 1.0, bf16 where the hardware has it, logging every 3 steps, a checkpoint every 250."""

    # --- data
    curriculum: str | None = field(default=None, metadata={
        "help": "curriculum: a YAML file, a data_mix JSON file or a directory of them (yulan_tune/data/mixture.py)"})
    data_root: str | None = field(default=None, metadata={
        "help": "directory where curriculum dataset names resolve (<data_root>/<name>); overrides the file's"})
    seq_len: int | None = field(default=None, metadata={"help": "row length when the curriculum does not give one"})
    stop_after_phase: str | None = field(default=None, metadata={
        "help": "run up to and including this phase, then stop (the next launch continues with the next phase)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory or hub id (required); on the command line 'tiny' is the offline tiny YuLan "
                "tokenizer (yulan_tune.tiny.resolve_tiny)"})
    prepare_bundled_data: bool = field(default=False, metadata={
        "help": "first write the bundled corpus (Python stdlib sources, math problems) as packed datasets "
                f"{', '.join(BUNDLED_DATASETS)} under data_root (the offline default)"})
    eval_datasets: list[str] | None = field(default=None, metadata={
        "help": "held-out packed datasets (names under data_root, or paths) evaluated at eval_steps"})
    eval_rows: int | None = field(default=None, metadata={"help": "evaluate on the first N rows of each eval set"})
    # --- model
    model_config: dict | str | None = field(default=None, metadata={
        "help": "yulanmini shape: YuLanMiniConfig.for_shape arguments (hidden_size, num_hidden_layers, "
                "num_attention_heads, num_key_value_heads, intermediate_size, dim_model_base_lr, ...) as a dict / "
                "JSON string, or a path to a yulanmini config.json"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from this yulanmini checkpoint's weights instead of a muP initialization"})
    gradient_checkpointing_step: int | None = field(default=None, metadata={
        "help": "recompute activations of every layer except each k-th (YuLan's gradient_checkpointing_step, 1.8)"})
    # --- optimization
    mup: bool = field(default=True, metadata={"help": "muP parameter groups (hidden matrices at lr / m_width)"})
    decay_vectors: bool = field(default=True, metadata={"help": "weight decay on biases, norms and scalars too"})
    warmup_tokens: str | None = field(default=None, metadata={"help": "warmup length in tokens (e.g. '2B')"})
    decay_steps: int = field(default=0, metadata={"help": "decay window at the end of the curriculum, in steps"})
    decay_tokens: str | None = field(default=None, metadata={"help": "decay window in tokens (e.g. '80B')"})
    decay_shape: str = field(default="1-sqrt", metadata={"help": "cosine | cos2 | linear | 1-sqrt"})
    end_lr_factor: float = field(default=0.0, metadata={"help": "LR at the end of the decay, as a fraction of peak"})
    # --- monitoring, checkpoints, export
    monitor_every_steps: int = field(default=23, metadata={"help": "hidden-state statistics every N steps; 0: off"})
    keep_last_checkpoints: int | None = field(default=3, metadata={
        "help": "complete checkpoints kept (the last one of each phase is always kept)"})
    keep_checkpoint_steps: list[int] | None = field(default=None, metadata={
        "help": "also save a checkpoint at each of these global steps and never rotate it away (a series for "
                "`yulan-tune dynamics`); the last checkpoint of each phase is always kept"})
    export_llama: bool = field(default=True, metadata={"help": "also write final-llama/ (the released Llama form)"})

    # YuLan-Mini's values for TrainingArguments fields (docs/yulan_reference.md 3.1, 3.7)
    learning_rate: float = field(default=1e-2, metadata={"help": "peak LR (muP: hidden matrices get lr / m_width)"})
    weight_decay: float = REFERENCE_WEIGHT_DECAY
    adam_beta1: float = REFERENCE_BETAS[0]
    adam_beta2: float = REFERENCE_BETAS[1]
    adam_epsilon: float = REFERENCE_EPS
    max_grad_norm: float = 1.0
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: where supported"})
    logging_steps: float = 3
    save_steps: float = 250
    report_to: None | str | list[str] = field(default_factory=lambda: ["tensorboard"])
    # the sampler seeks to the resumed step itself (training/trainer.py)
    ignore_data_skip: bool = True
    remove_unused_columns: bool = False

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch warns on every dataloader otherwise
        if isinstance(self.model_config, str) and self.model_config.strip().startswith("{"):
            self.model_config = json.loads(self.model_config)
        if self.save_total_limit is not None:
            raise ValueError("PretrainConfig: save_total_limit deletes checkpoints before the new one is complete; "
                             "use keep_last_checkpoints")
        if not self.ignore_data_skip:
            raise ValueError("PretrainConfig: ignore_data_skip must stay True (the sampler seeks to the resumed step)")
        if self.warmup_tokens is not None and self.warmup_steps:
            raise ValueError("PretrainConfig: give warmup_steps or warmup_tokens, not both")
        if self.decay_tokens is not None and self.decay_steps:
            raise ValueError("PretrainConfig: give decay_steps or decay_tokens, not both")
        if self.warmup_steps and (self.warmup_steps < 1 or self.warmup_steps != int(self.warmup_steps)):
            raise ValueError(f"PretrainConfig: warmup_steps is a number of steps, got {self.warmup_steps}; use "
                             f"warmup_tokens for a length in tokens")
        self.keep_checkpoint_steps = check_keep_steps(self.keep_checkpoint_steps) or None
        if self.gradient_checkpointing_step is not None:
            self.activation_checkpointing = True  # the model skips every k-th layer itself (build_model)
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ the recipe


@dataclass
class PhaseRun:
    plan: PhasePlan
    start_step: int
    resume_from: Path | None

    @property
    def end_step(self) -> int:
        return self.start_step + self.plan.steps


class PretrainRecipe:
    """Runs a `PretrainConfig` (see the module docstring). The pieces are methods so that annealing and experiments
    can reuse or replace one of them: `plan`, `build_schedule`, `build_model`, `make_trainer`.

    `callbacks` are added to every phase's Trainer (after the recipe's own checkpoint callback); `description`
    labels the progress bar. The recipe never changes `config`: per-phase arguments are copies.
    """

    def __init__(self, config: PretrainConfig, callbacks: list[TrainerCallback] | None = None, *,
                 description: str = "pretrain") -> None:
        if config.tokenizer is None:
            raise ValueError("PretrainConfig.tokenizer is required (a tokenizer directory or hub id)")
        if config.tokenizer == "tiny":
            raise ValueError("PretrainConfig.tokenizer 'tiny' is a name the command line resolves; in a script pass "
                             "yulan_tune.tiny.resolve_tiny('tiny', 'tokenizer')")
        if config.curriculum is None:
            raise ValueError("PretrainConfig.curriculum is required (a curriculum YAML or data_mix JSON)")
        if config.model_config is None and config.init_from is None:
            raise ValueError("PretrainConfig: give model_config (a new model's shape) or init_from (a checkpoint)")
        self.config = config
        self.callbacks = list(callbacks or [])
        self.description = description
        self.output_dir = Path(config.output_dir)

    # --- pieces ---------------------------------------------------------------------------------------------------
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.config.tokenizer)  # never trust_remote_code

    def rows_per_step(self) -> int:
        """Rows of every optimizer step across all data-parallel processes."""
        config = self.config
        _ = config.device  # sets up the distributed state; before that, world_size reads 1
        return config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size

    def plan(self) -> tuple[Curriculum, list[PhasePlan]]:
        curriculum = load_curriculum(self.config.curriculum)
        plans = plan_phases(curriculum, self.rows_per_step(), default_seq_len=self.config.seq_len,
                            data_root=self.config.data_root)
        return curriculum, plans

    def build_schedule(self, plans: list[PhasePlan]) -> WSDSchedule:
        """WSD over the whole curriculum in global steps: warmup from step 0, decay over the last steps (3.4)."""
        config = self.config
        total = sum(plan.steps for plan in plans)
        warmup = (token_budget_to_steps(plans, parse_token_count(config.warmup_tokens, "warmup_tokens"))
                  if config.warmup_tokens else int(config.warmup_steps))
        decay = (token_budget_to_steps(plans, parse_token_count(config.decay_tokens, "decay_tokens"), from_end=True)
                 if config.decay_tokens else config.decay_steps)
        if warmup + decay > total:
            raise ValueError(f"warmup ({warmup} steps) + decay ({decay} steps) exceed the curriculum's {total} steps")
        stable = None if decay == 0 else total - warmup - decay  # no decay: stable until the end (YuLan's phases)
        return WSDSchedule(warmup_steps=warmup, stable_steps=stable, decay_steps=decay,
                           decay_shape=config.decay_shape, end_lr_factor=config.end_lr_factor)

    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> YuLanMiniForCausalLM:
        """A muP-initialized yulanmini model of `model_config`'s shape (seeded), or the `init_from` checkpoint."""
        config = self.config
        if config.init_from is not None:
            model = YuLanMiniForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
        else:
            shape = config.model_config
            if isinstance(shape, str):
                model_config = YuLanMiniConfig.from_pretrained(shape)
            else:
                shape = dict(shape)
                shape.setdefault("dim_model_base_lr", 256)
                shape.setdefault("vocab_size", len(tokenizer))
                for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    shape.setdefault(name, getattr(tokenizer, name))
                model_config = YuLanMiniConfig.for_shape(**shape)
            if len(tokenizer) > model_config.vocab_size:
                raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is only "
                                 f"{model_config.vocab_size}")
            set_seed(config.seed)  # the initialization is part of the run's reproducibility
            model = YuLanMiniForCausalLM(model_config)
        if config.gradient_checkpointing_step is not None:
            model.config.gradient_checkpointing_step = config.gradient_checkpointing_step
        return model

    def phase_args(self, run: PhaseRun) -> PretrainConfig:
        args = copy.copy(self.config)
        args.max_steps = run.end_step  # global steps: the Trainer stops at the phase's last step
        return args

    def make_trainer(self, model: YuLanMiniForCausalLM, tokenizer: PreTrainedTokenizerBase, run: PhaseRun,
                     schedule: WSDSchedule, eval_datasets: dict[str, Any] | None,
                     bar: TrainingProgress) -> YuLanTrainer:
        dataset = open_phase(run.plan, seed=self._data_seed(), cache=self._dataset_cache)
        plan = run.plan
        keep_steps = set(self.config.keep_checkpoint_steps or ())

        def record(state) -> dict[str, Any]:  # the curriculum position, stored in every checkpoint's record
            return {"phase": plan.name, "phase_index": plan.index, "phase_start_step": run.start_step,
                    "phase_steps": plan.steps, "rows_per_step": plan.rows_per_step, "seq_len": plan.seq_len,
                    "dropped_rows": plan.dropped_rows,
                    "keep": state.global_step == run.end_step or state.global_step in keep_steps}

        trainer = YuLanTrainer(
            model=model, args=self.phase_args(run), train_dataset=dataset, eval_dataset=eval_datasets,
            processing_class=tokenizer, data_collator=default_data_collator,
            callbacks=[AtomicCheckpointCallback(self.config.keep_last_checkpoints, record),
                       SaveAtSteps(sorted(keep_steps)), *self.callbacks],
            schedule=schedule, dataset_start_step=run.start_step, mup=self.config.mup,
            decay_vectors=self.config.decay_vectors,
        )
        if self.config.monitor_every_steps:
            HiddenStateMonitor(every_n_steps=self.config.monitor_every_steps).attach(trainer)
        attach_harness_eval(trainer, self.config)
        return use_console_progress(trainer, bar)

    # --- the run --------------------------------------------------------------------------------------------------
    def _data_seed(self) -> int:
        return self.config.data_seed if self.config.data_seed is not None else self.config.seed

    def resume_point(self, plans: list[PhasePlan]) -> tuple[int, int, Path | None]:
        """(index of the phase to run, its first global step, checkpoint to resume from). Call after
        `remove_incomplete_checkpoints`: the newest complete checkpoint is the resume point."""
        latest = latest_complete_checkpoint(self.output_dir) if self.output_dir.exists() else None
        if latest is None:
            return 0, 0, None
        record = read_checkpoint_record(latest)
        names = [plan.name for plan in plans]
        if record.get("phase") not in names:
            raise CurriculumError(f"{latest} was written in phase {record.get('phase')!r}, which this curriculum "
                                  f"({self.config.curriculum}) does not have")
        index = names.index(record["phase"])
        plan = plans[index]
        planned_start = sum(p.steps for p in plans[:index])
        found = (record["phase_start_step"], record["phase_steps"], record["rows_per_step"])
        if found != (planned_start, plan.steps, plan.rows_per_step):
            raise CurriculumError(
                f"{latest}: phase {plan.name!r} started at step {found[0]} with {found[1]} steps of {found[2]} rows, "
                f"this config plans step {planned_start} with {plan.steps} steps of {plan.rows_per_step} rows. An "
                f"exact resume needs the same phases, budgets and batch size up to this phase.")
        if record["global_step"] == record["phase_start_step"] + record["phase_steps"]:
            return index + 1, record["global_step"], latest  # the phase is finished: the next starts from it
        return index, record["phase_start_step"], latest

    def prepare_inputs(self) -> list[Path]:
        """Work done once before training, by the main process first (the others then find it done): the bundled
        corpus when asked, and the removal of incomplete checkpoints (returned)."""
        config = self.config
        if config.prepare_bundled_data:
            if config.data_root is None:
                raise ValueError("prepare_bundled_data needs data_root (where the packed datasets go)")
            seq_len = config.seq_len or load_curriculum(config.curriculum).seq_len or 4096
            prepare_bundled_corpus(config.data_root, config.tokenizer, seq_len=seq_len, seed=config.seed)
        return remove_incomplete_checkpoints(self.output_dir) if self.output_dir.exists() else []

    def _eval_datasets(self) -> dict[str, Any] | None:
        if not self.config.eval_datasets:
            return None
        datasets = {}
        for name in self.config.eval_datasets:
            path = Path(name) if Path(name).is_absolute() or self.config.data_root is None \
                else Path(self.config.data_root) / name
            dataset = PackedDataset(path)
            if self.config.eval_rows is not None and self.config.eval_rows < len(dataset):
                dataset = torch.utils.data.Subset(dataset, range(self.config.eval_rows))
            datasets[Path(name).name] = dataset
        return datasets

    def run(self) -> dict[str, Any]:
        config = self.config
        with PartialState().main_process_first():
            removed = self.prepare_inputs()
        tokenizer = self.load_tokenizer()
        curriculum, plans = self.plan()
        schedule = self.build_schedule(plans)
        first, start_step, resume_from = self.resume_point(plans)
        resumed_from = resume_from
        stop = len(plans)
        if config.stop_after_phase is not None:
            names = [plan.name for plan in plans]
            if config.stop_after_phase not in names:
                raise CurriculumError(f"stop_after_phase {config.stop_after_phase!r} is not a phase of "
                                      f"{config.curriculum} ({names})")
            stop = names.index(config.stop_after_phase) + 1
        logger.info("curriculum %s: %d phases, %d steps; %s", config.curriculum, len(plans),
                    sum(p.steps for p in plans), f"resuming from {resume_from}" if resume_from else "starting fresh")

        self._dataset_cache: dict[str, PackedDataset] = {}
        model = self.build_model(tokenizer)
        eval_datasets = self._eval_datasets()
        phases_run, metrics, trainer = [], {}, None
        bar = TrainingProgress(self.description, total=sum(plan.steps for plan in plans[:stop]))
        for plan in plans[first:stop]:
            run = PhaseRun(plan=plan, start_step=start_step, resume_from=resume_from)
            logger.info("phase %r: steps %d-%d, %d rows of %d tokens per step, %s%s", plan.name, run.start_step,
                        run.end_step, plan.rows_per_step, plan.seq_len,
                        ", ".join(f"{name} {rows} rows" for name, rows in plan.rows.items()),
                        f"; {plan.dropped_rows} rows past the last whole step are not trained on"
                        if plan.dropped_rows else "")
            trainer = self.make_trainer(model, tokenizer, run, schedule, eval_datasets, bar)
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics = dict(output.metrics)
            phases_run.append(plan.name)
            start_step = run.end_step
            resume_from = self.output_dir / f"checkpoint-{run.end_step}"
            if read_checkpoint_record(resume_from) is None:
                raise RuntimeError(f"phase {plan.name!r} ended without a complete checkpoint at {resume_from}")
        bar.close()
        result = {"phases_run": phases_run, "global_step": start_step,
                  "resumed_from": str(resumed_from) if resumed_from else None,
                  "removed_incomplete": [str(p) for p in removed], "train_metrics": metrics,
                  "dropped_rows": {plan.name: plan.dropped_rows for plan in plans[first:stop]}}
        if trainer is not None and stop == len(plans):  # this launch finished the curriculum
            result.update(self.save_final(trainer))
        if PartialState().is_main_process:
            write_metrics(self.output_dir, result)
        return result

    def save_final(self, trainer: YuLanTrainer) -> dict[str, str]:
        """`final/` (yulanmini + tokenizer, to continue or anneal from) through `Trainer.save_model`, which gathers
        sharded (FSDP / DeepSpeed) weights; with `export_llama` also `final-llama/`, the released Llama form."""
        final = self.output_dir / "final"
        trainer.save_model(str(final))
        saved = {"final": str(final)}
        if self.config.export_llama:
            llama_dir = self.output_dir / "final-llama"
            if trainer.args.should_save:
                to_llama(final, llama_dir)  # copies the tokenizer files too
            trainer.accelerator.wait_for_everyone()
            saved["final_llama"] = str(llama_dir)
        return saved


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """`--config file.yaml` plus `--field value` overrides, parsed by trl's TrlParser (as the other recipes)."""
    from trl import TrlParser

    (config,) = TrlParser((PretrainConfig,)).parse_args_and_config(argv)
    return config
