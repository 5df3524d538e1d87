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

Defaults for the real model follow the YuLan-Mini-Instruct DPO stage (yulan_reference.md section 6: beta 0.1,
lr 5e-7, 2 epochs, batch 128); see recipes/configs/dpo_yulan_mini_instruct_*.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.data.formats import SkipReport
from yulan_tune.data.preferences import (
    BUNDLED_PREFERENCES,
    PreferenceExample,
    TokenizedPreferences,
    UnpairedExample,
    load_preference_examples,
    math_preference_pairs,
    tokenize_preferences,
    unpair,
)
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.paths import RECIPES_DIR
from yulan_tune.sft import TINY_MODEL, LoraGradientGuard, ModelAndAdapterFields, lora_config, resolve_model_path

logger = logging.getLogger(__name__)

# trl 1.16 DPOTrainer losses (trl/trainer/dpo_config.py `loss_type`), combinable with `loss_weights`
DPO_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"})
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})  # one trainer each, not combinable
UNPAIRED_LOSSES = frozenset({"kto", "apo_zero_unpaired"})  # trl KTOTrainer
QUICKSTART_DPO_CONFIG = RECIPES_DIR / "configs" / "dpo_tiny.yaml"


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
class DPOConfig(trl.DPOConfig, ModelAndAdapterFields):
    """trl.DPOConfig plus what a recipe needs; every field can be set in YAML or overridden on the command line."""

    model_name_or_path: str = field(default=TINY_MODEL, metadata={"help": "the SFT model: hub id, local dir, 'tiny'"})
    dataset: str = field(
        default=BUNDLED_PREFERENCES, metadata={"help": "file, dir, datasets dir, hub name or 'bundled:math_preferences'"}
    )
    dataset_split: str = field(default="train", metadata={"help": "split to read from dataset dirs / hub datasets"})
    eval_dataset: str | None = field(
        default=BUNDLED_PREFERENCES,
        metadata={"help": "held-out pairs scored before and after training ('bundled:...' = its held-out problems)"},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "split of eval_dataset for dirs / hub"})
    num_bundled_pairs: int = field(default=1000, metadata={"help": "training pairs generated for bundled data"})
    num_heldout_pairs: int = field(default=200, metadata={"help": "held-out pairs generated for bundled data"})
    overlong: str = field(
        default="drop", metadata={"help": "pairs longer than max_length: 'drop' or 'truncate' (both counted)"}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin (loss_type: [simpo])"})
    cpo_alpha: float = field(default=0.0, metadata={"help": "NLL weight for loss_type [simpo]; 0 = pure SimPO"})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO weight of desirable rows"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO weight of undesirable rows"})
    eval_math_problems: int = field(
        default=0, metadata={"help": "if > 0, held-out math exact-match before and after training on this many"}
    )

    def __post_init__(self):
        # trl defaults bf16 to True; on a CPU-only machine fp32 is both faster and exact, so default it off there.
        if self.bf16 is None and not torch.cuda.is_available():
            self.bf16 = False
        if self.on_bad_rows not in ("raise", "skip"):
            raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {self.on_bad_rows!r}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.quantization is not None and not self.use_peft:
            raise ValueError("quantization requires use_peft: true (a 4/8-bit base is trained through LoRA adapters)")
        super().__post_init__()
        self.method = preference_method(self.loss_type)
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
    """The row layout of trl's CPO / ORPO trainers (prompt_*, chosen_*, rejected_* with -100-masked labels)."""
    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        response = list(feature[f"{name}_ids"])
        row[f"{name}_input_ids"] = prompt + response
        row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(response))
        row[f"{name}_labels"] = [-100] * len(prompt) + response
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


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean, `average=True`) of log p(completion token | everything before it), one value per row.

    Runs the model in whatever train/eval mode it is in (a 4-bit model on CPU must not see an eval-mode forward
    before training: stack_notes.md, bitsandbytes trap 1).
    """
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + c for p, c in zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size])]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, prompt) in enumerate(zip(rows, prompt_ids[start:start + batch_size])):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            completion[i, len(prompt): len(row)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logps = log_probs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        scored = completion[:, 1:].to(device)
        sums = (token_logps * scored).sum(-1)
        values.append((sums / scored.sum(-1).clamp(min=1)) if average else sums)
    return torch.cat(values).cpu()


def pair_logps(model: PreTrainedModel, pairs: TokenizedPreferences, pad_token_id: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    prompts = pairs.columns["prompt_ids"]
    return (completion_logps(model, prompts, pairs.columns["chosen_ids"], pad_token_id=pad_token_id),
            completion_logps(model, prompts, pairs.columns["rejected_ids"], pad_token_id=pad_token_id))


def preference_metrics(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Held-out preference metrics from summed response log-probs (chosen, rejected) of the policy and reference.

    reward_accuracy: share of pairs whose DPO implicit reward, beta * log(pi / pi_ref) (Rafailov et al. 2023, eq. 5),
    is higher for chosen than for rejected; beta > 0 only scales it. Ties count 1/2, so the reference model itself
    scores exactly 0.5. logratio_margin: the mean of log(pi / pi_ref)(chosen) - log(pi / pi_ref)(rejected), in nats.
    logp_accuracy: share of pairs where the policy alone gives chosen the higher log-probability.
    """
    (chosen, rejected), (ref_chosen, ref_rejected) = policy, reference
    margins = (chosen - ref_chosen) - (rejected - ref_rejected)
    return {
        "reward_accuracy": ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item(),
        "logratio_margin": margins.mean().item(),
        "logp_accuracy": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item(),
        "chosen_logp": chosen.mean().item(),
        "rejected_logp": rejected.mean().item(),
    }


def _is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --------------------------------------------------------------------------------------------------------- recipe


class DPORecipe:
    """Load -> validate and tokenize pairs -> score held-out pairs -> train -> score again -> save."""

    def __init__(self, config: DPOConfig):
        self.config = config
        self.model_path = resolve_model_path(config.model_name_or_path)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.model_path, chat_template=config.chat_template)
        self.method = config.method
        self.trainer: Any = None
        self.train_data: TokenizedPreferences | None = None
        self.heldout: TokenizedPreferences | None = None
        self.reference_heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    # data -------------------------------------------------------------------------------------------------------
    def _examples(self, source: str, split: str, bundled_split: str, n_bundled: int) -> tuple[list, SkipReport]:
        if source == BUNDLED_PREFERENCES:
            return math_preference_pairs(n_bundled, self.config.seed, bundled_split), SkipReport()
        return load_preference_examples(source, on_error=self.config.on_bad_rows, split=split)

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
                                               overlong=c.overlong, report=report)
        logger.info("%s: %d rows kept; %s", c.dataset, len(self.train_data), report.summary())
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
            logger.info("%s: %d held-out pairs; %s", c.eval_dataset, len(self.heldout), held_report.summary())

    # model + trainer ----------------------------------------------------------------------------------------------
    def _load(self) -> PreTrainedModel:
        c = self.config
        model = load_model(self.model_path, quantization=c.quantization, dtype=c.dtype,
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
            # the policy before training is the reference of every method (LoRA B starts at zero)
            self.reference_heldout = pair_logps(model, self.heldout, self.tokenizer.pad_token_id)
        peft_config = lora_config(c) if c.use_peft else None
        callbacks = [LoraGradientGuard()] if c.use_peft else None
        train_dataset = self.train_data.to_dataset()
        # held-out pairs are scored by this recipe before and after training; trl's eval loop sees them only when
        # asked for (eval_strategy), and KTO's eval loop expects unpaired rows
        wants_trl_eval = self.heldout is not None and c.eval_strategy != "no" and self.method != "kto"
        eval_dataset = self.heldout.to_dataset() if wants_trl_eval else None
        if self.method in ("dpo", "kto") and _is_quantized(model):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=c.gradient_checkpointing)
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
        return self.trainer

    # evaluation -----------------------------------------------------------------------------------------------------
    def math_accuracy(self, model: PreTrainedModel) -> float:
        from yulan_tune.data.math_problems import generate_problems
        from yulan_tune.eval import math_accuracy

        problems = generate_problems(self.config.eval_math_problems, self.config.seed, split="test")
        return math_accuracy(model, self.tokenizer, problems)

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
        if c.eval_math_problems and can_generate_before and trainer.is_world_process_zero():
            metrics["math_accuracy_before"] = self.math_accuracy(trainer.model)
        result = trainer.train(resume_from_checkpoint=c.resume_from_checkpoint)
        metrics.update(train_loss=result.training_loss, train_rows=len(self.train_data),
                       skipped=dict(self.train_data.report.counts), train_seconds=round(time.time() - started, 1))
        out = Path(c.output_dir)
        trainer.save_model(str(out))  # full model, or only the adapter for LoRA / QLoRA
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            if self.heldout is not None:
                metrics["heldout_pairs"] = len(self.heldout)
                metrics["heldout_skipped"] = dict(self.heldout.report.counts)
                metrics["heldout_before"] = preference_metrics(self.reference_heldout, self.reference_heldout)
                metrics["heldout_after"] = self.evaluate_heldout(trainer.model)
            if c.eval_math_problems:
                metrics["math_accuracy_after"] = self.math_accuracy(trainer.model)
            (out / "yulan_tune_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def parse_config(argv: list[str] | None = None) -> DPOConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's own parser."""
    (config,) = trl.TrlParser((DPOConfig,)).parse_args_and_config(argv)
    return config


def dpo_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = DPORecipe(parse_config(argv)).run()
    print("dpo: " + json.dumps(metrics))
    return 0


def run_dpo_quickstart(sft_model_dir: str | Path, out_dir: str | Path, *, extra_args: list[str] | None = None
                       ) -> dict[str, Any]:
    """DPO on the quickstart's SFT model with recipes/configs/dpo_tiny.yaml; returns the measured metrics."""
    config = parse_config(["--config", str(QUICKSTART_DPO_CONFIG), "--model_name_or_path", str(sft_model_dir),
                           "--output_dir", str(out_dir), "--disable_tqdm", "true", *(extra_args or [])])
    return DPORecipe(config).run()
