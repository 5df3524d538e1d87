"""Supervised fine-tuning: `SFTConfig` (trl's, plus the model / data / LoRA fields a recipe needs) and `SFTRecipe`.

    from yulan_tune import SFTConfig, SFTRecipe
    SFTRecipe(SFTConfig(model_name_or_path="tiny", dataset="data/train.jsonl", output_dir="out")).run()

The recipe renders every conversation with the model's chat template and computes exact assistant-only labels
(yulan_tune.data.chat), then hands trl's SFTTrainer a tokenized dataset; trl packs it (padding-free, per-document
attention) and trains full, LoRA or QLoRA.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback

from yulan_tune.data.chat import TokenizedConversation, tokenize_conversation, tokenize_text
from yulan_tune.loading import load_model, load_tokenizer

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"  # model_name_or_path value that resolves to the embedded tiny YuLan (built on first use)
BUNDLED_MATH = "bundled:math"  # dataset value that resolves to the generated math word problems


@dataclass
class ModelAndAdapterFields:
    """Config fields the SFT and DPO recipes share: how the model is loaded (precision, quantization, attention), the
    LoRA adapter (for DPO, the reference model is the policy with the adapter disabled), the chat template and what
    to do with invalid rows."""

    chat_template: str | None = field(
        default=None, metadata={"help": "a name in chat_templates/ or a .jinja path; default: the model's own"}
    )
    on_bad_rows: str = field(
        default="raise", metadata={"help": "'raise' stops at the first invalid row; 'skip' counts and reports it"}
    )
    quantization: str | None = field(default=None, metadata={"help": "None, '4bit' (QLoRA, NF4) or '8bit'"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, ...; default bf16 on GPU else fp32"})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2"})
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized LoRA scaling alpha/sqrt(r)"})


@dataclass
class SFTConfig(trl.SFTConfig, ModelAndAdapterFields):
    """trl.SFTConfig plus what a recipe needs; every field can be set in YAML or overridden on the command line."""

    model_name_or_path: str = field(default=TINY_MODEL, metadata={"help": "hub id, local dir, or 'tiny'"})
    dataset: str = field(default=BUNDLED_MATH, metadata={"help": "file, dir, datasets dir, hub name or 'bundled:math'"})
    dataset_split: str = field(default="train", metadata={"help": "split to read from dataset dirs / hub datasets"})
    eval_dataset: str | None = field(default=None, metadata={"help": "optional held-out data in any supported format"})
    num_bundled_examples: int = field(default=2000, metadata={"help": "size of the generated bundled:math set"})
    overlong: str = field(
        default="truncate", metadata={"help": "rows longer than max_length: 'truncate' or 'drop' (both counted)"}
    )
    eval_math_problems: int = field(
        default=0, metadata={"help": "if > 0, measure held-out math exact-match on this many problems after training"}
    )

    def __post_init__(self):
        # trl defaults bf16 to True; on a CPU-only machine fp32 is both faster and exact, so default it off there.
        if self.bf16 is None and not torch.cuda.is_available():
            self.bf16 = False
        if self.on_bad_rows not in ("raise", "skip"):
            raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {self.on_bad_rows!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.quantization is not None and not self.use_peft:
            raise ValueError("quantization requires use_peft: true (a 4/8-bit base is trained through LoRA adapters)")
        super().__post_init__()


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == TINY_MODEL:
        from yulan_tune.modeling.tiny import build_tiny

        return str(build_tiny())
    return name_or_path


def math_sft_examples(n: int, seed: int = 0) -> list[list[dict]]:
    """The bundled SFT set: generated math problems as user/assistant conversations (train split)."""
    from yulan_tune.data.math_problems import generate_problems
    from yulan_tune.eval import math_messages

    return [math_messages(p) + [{"role": "assistant", "content": p.solution}] for p in generate_problems(n, seed)]


@dataclass
class TokenizedSplit:
    dataset: Dataset
    report: Any  # yulan_tune.data.formats.SkipReport
    lengths: list[int]


def load_conversations(source: str, config: SFTConfig) -> tuple[list[Any], Any]:
    """(examples, skip report); bundled:math is generated, anything else goes through the format validators."""
    from yulan_tune.data.formats import SFTExample, SkipReport, load_sft_examples

    if source == BUNDLED_MATH:
        examples = [SFTExample(messages=m, text=None, source=BUNDLED_MATH, line=i + 1)
                    for i, m in enumerate(math_sft_examples(config.num_bundled_examples, config.seed))]
        return examples, SkipReport()
    return load_sft_examples(source, on_error=config.on_bad_rows, split=config.dataset_split)


def tokenize_examples(
    examples: list[Any], report: Any, tokenizer: PreTrainedTokenizerBase, max_length: int | None, overlong: str
) -> TokenizedSplit:
    """Tokenize with exact labels; over-long rows are truncated or dropped and rows with nothing to train are
    skipped, every one of them counted in `report`."""
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    lengths = []
    for example in examples:
        where = f"{example.source}:{example.line}"
        tokens: TokenizedConversation = (
            tokenize_conversation(tokenizer, example.messages)
            if example.messages is not None
            else tokenize_text(tokenizer, example.text)
        )
        if max_length is not None and len(tokens.input_ids) > max_length:
            if overlong == "drop":
                report.add("too_long_dropped", where, f"{len(tokens.input_ids)} tokens > max_length {max_length}")
                continue
            report.add("too_long_truncated", where, f"{len(tokens.input_ids)} tokens cut to {max_length}")
            tokens = TokenizedConversation(tokens.input_ids[:max_length], tokens.labels[:max_length])
        if tokens.num_trained == 0:
            report.add("no_trainable_tokens", where, "no assistant tokens left to train on")
            continue
        rows["input_ids"].append(tokens.input_ids)
        rows["labels"].append(tokens.labels)
        lengths.append(len(tokens.input_ids))
    if not rows["input_ids"]:
        raise ValueError(f"no usable training rows. {report.summary()}")
    return TokenizedSplit(Dataset.from_dict(rows), report, lengths)


def lora_config(config: SFTConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


class LoraGradientGuard(TrainerCallback):
    """Fails the run at the first optimizer step if no LoRA weight received a gradient.

    bitsandbytes on CPU repacks 4-bit weights in place on the first no-grad forward, after which LoRA gradients are
    exactly zero and training silently does nothing (stack_notes.md, trap 1). lora_B starts at zero, so its gradient
    is the one that must be non-zero at step one.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 or model is None:
            return
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
        if grads and all(g is None or not torch.any(g) for g in grads):
            raise RuntimeError(
                "LoRA weights received zero gradients at the first step. On CPU this happens when a 4-bit model ran "
                "an eval/no-grad forward before training (bitsandbytes repacks its weights); reload the model "
                "before training it."
            )


class RankSummaryCallback(TrainerCallback):
    """Each process prints what it did at the end of training: with several processes (DDP / FSDP / DeepSpeed)
    this shows every rank trained, and that they ended on the same weights."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        checksum = sum(float(p.detach().float().sum()) for p in model.parameters() if p.requires_grad) if model else 0.0
        # one write with its newline: ranks share stdout, and print's separate "\n" write can interleave
        line = (f"rank {args.process_index}/{args.world_size}: steps={state.global_step} "
                f"trainable_checksum={checksum:.6e}")
        print(line + "\n", end="", flush=True)


class SFTRecipe:
    """Load -> validate and tokenize data -> train with trl's SFTTrainer -> save model (or adapter) and tokenizer."""

    def __init__(self, config: SFTConfig):
        self.config = config
        self.model_path = resolve_model_path(config.model_name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, chat_template=config.chat_template)
        self.trainer: trl.SFTTrainer | None = None
        self.train_split: TokenizedSplit | None = None

    def prepare_data(self) -> tuple[Dataset, Dataset | None]:
        c = self.config
        examples, report = load_conversations(c.dataset, c)
        self.train_split = tokenize_examples(examples, report, self.tokenizer, c.max_length, c.overlong)
        logger.info("train rows: %d kept. %s", len(self.train_split.lengths), report.summary())
        eval_dataset = None
        if c.eval_dataset:
            eval_examples, eval_report = load_conversations(c.eval_dataset, c)
            eval_dataset = tokenize_examples(eval_examples, eval_report, self.tokenizer, c.max_length, c.overlong).dataset
        return self.train_split.dataset, eval_dataset

    def build_trainer(self) -> trl.SFTTrainer:
        c = self.config
        train_dataset, eval_dataset = self.prepare_data()
        model = load_model(
            self.model_path,
            quantization=c.quantization,
            dtype=c.dtype,
            attn_implementation=c.attn_implementation,
        )
        self.trainer = trl.SFTTrainer(
            model=model,
            args=c,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.tokenizer,
            peft_config=lora_config(c) if c.use_peft else None,
            callbacks=[RankSummaryCallback()] + ([LoraGradientGuard()] if c.use_peft else []),
        )
        return self.trainer

    def run(self) -> dict[str, Any]:
        trainer = self.trainer or self.build_trainer()
        result = trainer.train(resume_from_checkpoint=self.config.resume_from_checkpoint)
        out = Path(self.config.output_dir)
        trainer.save_model(str(out))  # full model, or only the adapter for LoRA / QLoRA
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            if self.config.use_peft:
                from yulan_tune.export import write_adapter_info

                write_adapter_info(out, self.model_path, self.config.quantization)
        metrics: dict[str, Any] = {"train_loss": result.training_loss, "train_rows": len(self.train_split.lengths),
                                   "skipped": dict(self.train_split.report.counts)}
        if self.config.eval_math_problems and trainer.is_world_process_zero():
            from yulan_tune.data.math_problems import generate_problems
            from yulan_tune.eval import math_accuracy

            problems = generate_problems(self.config.eval_math_problems, self.config.seed, split="test")
            metrics["math_accuracy"] = math_accuracy(trainer.model, self.tokenizer, problems)
        if trainer.is_world_process_zero():
            (out / "yulan_tune_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's own parser."""
    (config,) = trl.TrlParser((SFTConfig,)).parse_args_and_config(argv)
    return config


def sft_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = SFTRecipe(parse_config(argv)).run()
    print("sft: " + json.dumps(metrics))
    return 0
