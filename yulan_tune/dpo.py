"""Preference training: `DPOConfig` (trl's, plus model / data / LoRA fields) and `DPORecipe`.

    from yulan_tune import DPOConfig, DPORecipe
    DPORecipe(DPOConfig(model_name_or_path="outputs/quickstart/model", output_dir="out")).run()

The loss is a config choice, `loss_type`, and each runs through trl:
- DPO and its direct siblings (`sigmoid` = DPO, `ipo`, `hinge`, and trl's other DPO losses): `trl.DPOTrainer`;
- `simpo`: trl's CPO trainer with SimPO's loss (length-normalized, reference-free, `cpo_alpha` 0 = pure SimPO);
- `orpo`: trl's ORPO trainer (reference-free: NLL on chosen plus `beta` x odds-ratio term; trl 1.16 takes that
  NLL over the whole chosen sequence, prompt tokens included, where the ORPO paper uses the response only);
- `kto` (or `apo_zero_unpaired`): `trl.KTOTrainer`; pairs are unpaired into desirable / undesirable rows.

Pairs are validated and tokenized once by `yulan_tune.data.preferences` with the SFT chat rendering, and handed to
the trainers pre-tokenized (each trainer subclass below only routes such rows past trl's own tokenization).
LoRA (`use_peft`) uses the adapter-disabled policy as the reference: one copy of the base weights. Full DPO either
holds a frozen reference copy or, with `precompute_ref_log_probs`, scores the data once and drops it.

Defaults for the real model follow the YuLan-Mini-Instruct DPO stage (docs/yulan_reference.md section 6: beta 0.1,
lr 5e-7, 2 epochs, batch 128); see recipes/configs/dpo_yulan_mini_instruct_*.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.console import write_metrics
from yulan_tune.conventions import IGNORE_INDEX
from yulan_tune.data.bundled import MATH_PREFERENCES, check_bundled, is_bundled
from yulan_tune.data.math_problems import MathProblem, generate_problems, solutions
from yulan_tune.data.preferences import (
    REJECTED_SPANS,
    PreferenceExample,
    TokenizedPreferences,
    UnpairedExample,
    load_preference_examples,
    math_preference_pairs,
    tokenize_preferences,
    unpair,
)
from yulan_tune.data.records import SkipReport
from yulan_tune.evaluation.during_training import HarnessEvalArguments, attach_harness_eval
from yulan_tune.evaluation.exact_match import math_correct
from yulan_tune.evaluation.paired import compare_paired
from yulan_tune.evaluation.preferences import pair_logps, preference_metrics
from yulan_tune.export import write_adapter_info
from yulan_tune.loading import load_model, load_tokenizer, quantization_name
from yulan_tune.tiny import resolve_tiny
from yulan_tune.training.callbacks import LoraGradientGuard, TrainingProgress, use_console_progress
from yulan_tune.training.checkpoints import AtomicCheckpointCallback, resume_checkpoint
from yulan_tune.training.post_training import PostTrainingModelConfig, resolve_cpu_precision

logger = logging.getLogger(__name__)

# trl 1.16 DPOTrainer losses (trl/trainer/dpo_config.py `loss_type`), combinable with `loss_weights`
DPO_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"})
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})  # one trainer each, not combinable
UNPAIRED_LOSSES = frozenset({"kto", "apo_zero_unpaired"})  # trl KTOTrainer


def preference_method(loss_type: list[str]) -> str:
    """'dpo', 'simpo', 'orpo' or 'kto': which trl trainer runs `loss_type`."""
    losses = set(loss_type)
    if losses and losses <= DPO_LOSSES:
        return "dpo"
    if len(loss_type) == 1 and loss_type[0] in REFERENCE_FREE_LOSSES:
        return loss_type[0]
    if len(loss_type) == 1 and loss_type[0] in UNPAIRED_LOSSES:
        return "kto"
    raise ValueError(
        f"loss_type {loss_type}: expected DPO losses (combinable) from {sorted(DPO_LOSSES)}, or exactly one of "
        f"{sorted(REFERENCE_FREE_LOSSES | UNPAIRED_LOSSES)}"
    )


@dataclass
class DPOConfig(trl.DPOConfig, PostTrainingModelConfig, HarnessEvalArguments):
    """trl.DPOConfig plus trl.ModelConfig and what a recipe needs; every field can be set in YAML or overridden on
    the command line."""

    model_name_or_path: str = field(default="tiny", metadata={"help": "the SFT model: hub id, local dir, 'tiny'"})
    dataset: str = field(
        default=MATH_PREFERENCES, metadata={"help": f"file, dir, datasets dir, hub name or '{MATH_PREFERENCES}'"}
    )
    dataset_split: str = field(default="train", metadata={"help": "split to read from dataset dirs / hub datasets"})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": f"held-out pairs scored before and after training ('{MATH_PREFERENCES}': its held-out "
                          "problems); none by default"},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "split of eval_dataset for dirs / hub"})
    num_bundled_pairs: int = field(default=1000, metadata={"help": "training pairs generated for bundled data"})
    num_heldout_pairs: int = field(default=200, metadata={"help": "held-out pairs generated for bundled data"})
    overlong: str = field(
        default="drop", metadata={"help": "pairs longer than max_length: 'drop' or 'truncate' (both counted)"}
    )
    rejected_span: str = field(default="full", metadata={
        "help": "'full', or 'first_difference': each rejected response is cut after its first token that differs "
                "from the chosen one, so only the mistake is pushed down, not the tokens that follow from it "
                "(step-level DPO; for answers in a fixed worked format)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin (loss_type: [simpo])"})
    cpo_alpha: float = field(default=0.0, metadata={"help": "NLL weight for loss_type [simpo]; 0 = pure SimPO"})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO weight of desirable rows"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO weight of undesirable rows"})
    eval_math_problems: int = field(
        default=0, metadata={"help": "if > 0, held-out math exact-match before and after training on this many"}
    )
    # trl defaults the deprecated alias `gradient_checkpointing` to True, which makes transformers warn on every
    # config; resolve_model_fields gives the same default under the current name
    gradient_checkpointing: bool | None = None
    activation_checkpointing: bool | None = None
    # TrainingArguments' default is off; None: on where liger-kernel is installed and CUDA runs it
    use_liger_kernel: bool | None = field(default=None, metadata={
        "help": "Liger's fused RMSNorm / SwiGLU / RoPE / cross-entropy kernels; default: on where liger-kernel is "
                "installed and CUDA is available"})

    def __post_init__(self):
        resolve_cpu_precision(self)
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.rejected_span not in REJECTED_SPANS:
            raise ValueError(f"rejected_span must be one of {REJECTED_SPANS}, got {self.rejected_span!r}")
        self.resolve_model_fields()
        super().__post_init__()
        self.method = preference_method(self.loss_type)
        if self.rejected_span != "full" and self.method == "kto":
            raise ValueError("rejected_span applies to pairs; loss_type [kto] trains on unpaired rows")
        if self.method in ("simpo", "orpo") and self.precompute_ref_log_probs:
            raise ValueError(f"loss_type [{self.method}] is reference-free: precompute_ref_log_probs does not apply")


# ------------------------------------------------------------------------------------------------------- trainers


def _is_pretokenized(dataset: Any, columns: tuple[str, ...]) -> bool:
    return dataset is not None and set(columns) <= set(getattr(dataset, "column_names", None) or ())


class YuLanDPOTrainer(trl.DPOTrainer):
    """trl's DPOTrainer, taking rows already tokenized by `yulan_tune.data.preferences`.

    trl 1.16's `_prepare_dataset` re-derives prompt/response ids from text and has no pass-through for tokenized
    data, although its `evaluate` docstring assumes one; ours are exact (same rendering as SFT), so they go through.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if _is_pretokenized(dataset, ("prompt_ids", "chosen_ids", "rejected_ids")):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class YuLanKTOTrainer(trl.KTOTrainer):
    """trl's KTOTrainer, taking rows already tokenized (prompt_ids / completion_ids / label).

    KTO's KL term is estimated on mismatched (prompt, completion) pairs within each batch (KTO paper, section 4.1):
    completions rotated by one inside each `per_device_train_batch_size` block, the construction trl applies to
    the rows it tokenizes itself.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not _is_pretokenized(dataset, ("prompt_ids", "completion_ids", "label")):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL:
            def rotate(batch: dict[str, list]) -> dict[str, list]:
                return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def _concatenated_row(feature: dict) -> dict:
    """The row layout of trl's CPO / ORPO trainers (prompt_*, chosen_*, rejected_* with IGNORE_INDEX on the prompt)."""
    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        response = list(feature[f"{name}_ids"])
        row[f"{name}_input_ids"] = prompt + response
        row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(response))
        row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + response
    return row


def _cpo_trainer_class() -> type:
    from trl.experimental.cpo import CPOTrainer

    class YuLanCPOTrainer(CPOTrainer):
        """trl's CPO trainer (SimPO loss) on pre-tokenized rows: `tokenize_row` is its per-row tokenization hook."""

        def tokenize_row(self, feature, model=None):
            return _concatenated_row(feature) if "prompt_ids" in feature else super().tokenize_row(feature, model)

    return YuLanCPOTrainer


def _orpo_trainer_class() -> type:
    from trl.experimental.orpo import ORPOTrainer

    class YuLanORPOTrainer(ORPOTrainer):
        """trl's ORPO trainer on pre-tokenized rows: `tokenize_row` is its per-row tokenization hook."""

        def tokenize_row(self, feature, model=None):
            return _concatenated_row(feature) if "prompt_ids" in feature else super().tokenize_row(feature, model)

    return YuLanORPOTrainer


def derived_config(config: DPOConfig, config_class: type, **overrides: Any) -> Any:
    """`config_class` (CPOConfig / ORPOConfig / KTOConfig) with every field it shares with `config`, plus overrides."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config_class)
              if f.init and hasattr(config, f.name)}
    values.update(overrides)
    return config_class(**values)


def _is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --------------------------------------------------------------------------------------------------------- recipe


class DPORecipe:
    """Load -> validate and tokenize pairs -> score held-out pairs -> train -> score again -> save."""

    def __init__(self, config: DPOConfig):
        self.config = config
        self.model_path = resolve_tiny(config.model_name_or_path, "model")
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.model_path, chat_template=config.chat_template)
        self.method = config.method
        self.trainer: Any = None
        self.train_data: TokenizedPreferences | None = None
        self.heldout: TokenizedPreferences | None = None
        self.reference_heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    # data -------------------------------------------------------------------------------------------------------
    def _examples(self, source: str, split: str, bundled_split: str, n_bundled: int) -> tuple[list, SkipReport]:
        if is_bundled(source):
            check_bundled(source, (MATH_PREFERENCES,), "preference training")
            return math_preference_pairs(n_bundled, self.config.seed, bundled_split), SkipReport()
        return load_preference_examples(source, on_bad_rows=self.config.on_bad_rows, split=split,
                                        columns=self.config.columns)

    def prepare_data(self) -> None:
        c = self.config
        examples, report = self._examples(c.dataset, c.dataset_split, "train", c.num_bundled_pairs)
        if self.method == "kto":
            # KTO trains in a fixed order (its KL term pairs each row with its batch neighbour), so mix desirable and
            # undesirable rows once here instead of per epoch
            examples = unpair(examples)
            random.Random(c.seed).shuffle(examples)
        elif any(isinstance(e, UnpairedExample) for e in examples):
            raise ValueError(f"{c.dataset}: unpaired rows (prompt/completion/label) need loss_type: [kto]; "
                             f"loss_type {c.loss_type} trains on chosen/rejected pairs")
        self.train_data = tokenize_preferences(examples, self.tokenizer, max_length=c.max_length,
                                               overlong=c.overlong, rejected_span=c.rejected_span, report=report)
        logger.debug("%s: %d rows kept; %s", c.dataset, len(self.train_data), report.summary())
        if not len(self.train_data):
            raise ValueError(f"{c.dataset}: no usable rows. {report.summary()}")
        if c.eval_dataset:
            held, held_report = self._examples(c.eval_dataset, c.eval_dataset_split, "test", c.num_heldout_pairs)
            pairs = [e for e in held if isinstance(e, PreferenceExample)]
            if len(pairs) != len(held):
                logger.warning("%s: %d unpaired rows are not scored (held-out metrics need pairs)", c.eval_dataset,
                               len(held) - len(pairs))
            self.heldout = tokenize_preferences(pairs, self.tokenizer, max_length=c.max_length, overlong=c.overlong,
                                                report=held_report)
            logger.debug("%s: %d held-out pairs; %s", c.eval_dataset, len(self.heldout), held_report.summary())

    # model + trainer ----------------------------------------------------------------------------------------------
    def _load(self) -> PreTrainedModel:
        c = self.config
        model = load_model(self.model_path, quantization=quantization_name(c), dtype=c.dtype,
                           attn_implementation=c.attn_implementation)
        if _is_quantized(model) and not torch.cuda.is_available():
            model.train()  # bitsandbytes repacks 4-bit weights on an eval-mode no-grad CPU forward (trap 1)
        return model

    def build_trainer(self) -> Any:
        c = self.config
        if self.train_data is None:
            self.prepare_data()
        model = self._load()
        if not _is_quantized(model):
            model.to(c.device)  # score the held-out pairs on the accelerator (the Trainer would move it there anyway)
        if self.heldout is not None and len(self.heldout):
            # the policy before training is the reference of every method (LoRA B starts at zero); a 4-bit model on
            # CPU must not see an eval-mode forward before training (bitsandbytes trap 1)
            can_eval = not (_is_quantized(model) and not torch.cuda.is_available())
            self.reference_heldout = pair_logps(model, self.heldout, self.tokenizer.pad_token_id, eval_mode=can_eval)
        peft_config = trl.get_peft_config(c)
        callbacks = [AtomicCheckpointCallback()] + ([LoraGradientGuard()] if c.use_peft else [])
        train_dataset = self.train_data.to_dataset()
        # held-out pairs are scored by this recipe before and after training; trl's eval loop sees them only when
        # asked for (eval_strategy), and KTO's eval loop expects unpaired rows
        wants_trl_eval = self.heldout is not None and c.eval_strategy != "no" and self.method != "kto"
        eval_dataset = self.heldout.to_dataset() if wants_trl_eval else None
        if self.method in ("dpo", "kto") and _is_quantized(model):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=c.activation_checkpointing)
        # full training keeps a frozen reference copy unless its log-probs are precomputed; LoRA disables adapters
        needs_reference = self.method in ("dpo", "kto") and not c.use_peft and not c.precompute_ref_log_probs
        ref_model = self._load().eval() if needs_reference else None
        if ref_model is not None:
            ref_model.requires_grad_(False)
        common = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=self.tokenizer,
                      peft_config=peft_config, callbacks=callbacks)
        if self.method == "dpo":
            self.trainer = YuLanDPOTrainer(model=model, ref_model=ref_model, args=c, **common)
        elif self.method == "kto":
            from trl import KTOConfig

            # the KL estimate pairs each row with a neighbour in a fixed-order batch: trl requires sequential sampling
            sampling = "sequential" if c.loss_type[0] == "kto" else c.train_sampling_strategy
            args = derived_config(c, KTOConfig, loss_type=c.loss_type[0], train_sampling_strategy=sampling)
            self.trainer = YuLanKTOTrainer(model=model, ref_model=ref_model, args=args, **common)
        elif self.method == "simpo":
            from trl.experimental.cpo import CPOConfig

            args = derived_config(c, CPOConfig, loss_type="simpo")
            self.trainer = _cpo_trainer_class()(model=model, args=args, **common)
        else:
            from trl.experimental.orpo import ORPOConfig

            self.trainer = _orpo_trainer_class()(model=model, args=derived_config(c, ORPOConfig), **common)
        attach_harness_eval(self.trainer, c)
        return use_console_progress(self.trainer, TrainingProgress(self.method))

    # evaluation -----------------------------------------------------------------------------------------------------
    def math_problems(self) -> list[MathProblem]:
        return generate_problems(self.config.eval_math_problems, self.config.seed, split="test")

    def math_correct(self, model: PreTrainedModel) -> list[bool]:
        return math_correct(model, self.tokenizer, self.math_problems())

    def evaluate_heldout(self, model: PreTrainedModel) -> dict[str, float]:
        if self.reference_heldout is None or self.heldout is None:
            return {}
        policy = pair_logps(model, self.heldout, self.tokenizer.pad_token_id)
        return preference_metrics(policy, self.reference_heldout)

    def run(self) -> dict[str, Any]:
        c = self.config
        started = time.time()
        metrics: dict[str, Any] = {"method": self.method, "loss_type": list(c.loss_type)}
        trainer = self.trainer or self.build_trainer()
        can_generate_before = not (_is_quantized(trainer.model) and not torch.cuda.is_available())
        correct_before = None
        if c.eval_math_problems and can_generate_before and trainer.is_world_process_zero():
            correct_before = self.math_correct(trainer.model)
            metrics["math_accuracy_before"] = sum(correct_before) / len(correct_before)
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(c.resume_from_checkpoint, c.output_dir))
        metrics.update(train_loss=result.training_loss, train_rows=len(self.train_data),
                       skipped=dict(self.train_data.report.counts),
                       rejected_cut=self.train_data.report.counts.get("rejected_cut_at_first_difference", 0),
                       train_seconds=round(time.time() - started, 1))
        out = Path(c.output_dir)
        trainer.save_model(str(out))  # full model, or only the adapter for LoRA / QLoRA
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            if c.use_peft:
                write_adapter_info(out, self.model_path, quantization_name(c))
            if self.heldout is not None:
                metrics["heldout_pairs"] = len(self.heldout)
                metrics["heldout_skipped"] = dict(self.heldout.report.counts)
                metrics["heldout_before"] = preference_metrics(self.reference_heldout, self.reference_heldout)
                metrics["heldout_after"] = self.evaluate_heldout(trainer.model)
            if c.eval_math_problems:
                correct_after = self.math_correct(trainer.model)
                metrics["math_accuracy_after"] = sum(correct_after) / len(correct_after)
                if correct_before is not None:  # the same problems before and after: which changed, and is it noise
                    clusters = solutions(self.math_problems())  # problems with the same worked solution
                    metrics["math_paired"] = compare_paired(correct_before, correct_after, clusters=clusters).as_dict()
            write_metrics(out, metrics)
        return metrics


def parse_config(argv: list[str] | None = None) -> DPOConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's own parser."""
    (config,) = trl.TrlParser((DPOConfig,)).parse_args_and_config(argv)
    return config
