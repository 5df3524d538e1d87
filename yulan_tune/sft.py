"""Supervised fine-tuning: `SFTConfig` (trl's, plus trl's ModelConfig and the data fields a recipe needs) and
`SFTRecipe`.

    from yulan_tune import SFTConfig, SFTRecipe
    SFTRecipe(SFTConfig(model_name_or_path="tiny", dataset="data/train.jsonl", output_dir="out")).run()

The recipe renders every conversation with the model's chat template and computes exact assistant-only labels
(yulan_tune.data.chat), then hands trl's SFTTrainer a tokenized dataset; trl packs it (padding-free, per-document
attention) and trains full, LoRA or QLoRA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from yulan_tune.console import write_metrics
from yulan_tune.data.bundled import MATH_CHAT, check_bundled, is_bundled, math_chat_examples
from yulan_tune.data.chat import TokenizedConversation, tokenize_conversation, tokenize_text
from yulan_tune.data.formats import SFTExample, load_sft_examples
from yulan_tune.data.math_problems import generate_problems
from yulan_tune.data.records import SkipReport, check_txt_split
from yulan_tune.evaluation.during_training import HarnessEvalArguments, attach_harness_eval
from yulan_tune.evaluation.exact_match import math_accuracy
from yulan_tune.export import write_adapter_info
from yulan_tune.loading import load_model, load_tokenizer, quantization_name
from yulan_tune.tiny import resolve_tiny
from yulan_tune.training.callbacks import LoraGradientGuard, RankSummaryCallback, TrainingProgress, use_console_progress
from yulan_tune.training.checkpoints import AtomicCheckpointCallback, resume_checkpoint
from yulan_tune.training.post_training import PostTrainingModelConfig, resolve_cpu_precision

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(trl.SFTConfig, PostTrainingModelConfig, HarnessEvalArguments):
    """trl.SFTConfig plus trl.ModelConfig and what a recipe needs; every field can be set in YAML or overridden on
    the command line."""

    dataset: str = field(default=MATH_CHAT, metadata={
        "help": f"file, dir, datasets dir, hub name or '{MATH_CHAT}' (generated math conversations)"})
    dataset_split: str = field(default="train", metadata={"help": "split to read from dataset dirs / hub datasets"})
    eval_dataset: str | None = field(default=None, metadata={"help": "optional held-out data in any supported format"})
    num_bundled_examples: int = field(default=2000, metadata={"help": f"size of the generated {MATH_CHAT} set"})
    overlong: str = field(
        default="truncate", metadata={"help": "rows longer than max_length: 'truncate' or 'drop' (both counted)"}
    )
    txt_split: str = field(default="file", metadata={
        "help": "plain-text files (.txt/.md): one `text` row per file, or 'blank_lines': one per blank-line-separated "
                "block"})
    eval_math_problems: int = field(
        default=0, metadata={"help": "if > 0, measure held-out math exact-match on this many problems after training"}
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
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        check_txt_split(self.txt_split)
        self.resolve_model_fields()
        super().__post_init__()


@dataclass
class TokenizedSplit:
    dataset: Dataset
    report: SkipReport
    lengths: list[int]


def load_conversations(source: str, config: SFTConfig) -> tuple[list[SFTExample], SkipReport]:
    """(examples, skip report); bundled:math_chat is generated, anything else goes through the format validators."""
    if is_bundled(source):
        check_bundled(source, (MATH_CHAT,), "SFT")
        return math_chat_examples(config.num_bundled_examples, config.seed), SkipReport()
    return load_sft_examples(source, on_bad_rows=config.on_bad_rows, split=config.dataset_split,
                             columns=config.columns, txt_split=config.txt_split)


def tokenize_examples(
    examples: list[SFTExample], report: SkipReport, tokenizer: PreTrainedTokenizerBase, max_length: int | None,
    overlong: str
) -> TokenizedSplit:
    """Tokenize with exact labels; over-long rows are truncated or dropped and rows with nothing to train are
    skipped, every one of them counted in `report`."""
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    lengths = []
    for example in examples:
        tokens: TokenizedConversation = (
            tokenize_conversation(tokenizer, example.messages)
            if example.messages is not None
            else tokenize_text(tokenizer, example.text)
        )
        if max_length is not None and len(tokens.input_ids) > max_length:
            if overlong == "drop":
                report.add("too_long_dropped", example.where, f"{len(tokens.input_ids)} tokens > max_length {max_length}")
                continue
            report.add("too_long_truncated", example.where, f"{len(tokens.input_ids)} tokens cut to {max_length}")
            tokens = TokenizedConversation(tokens.input_ids[:max_length], tokens.labels[:max_length])
        if tokens.num_trained == 0:
            report.add("no_trainable_tokens", example.where, "no assistant tokens left to train on")
            continue
        rows["input_ids"].append(tokens.input_ids)
        rows["labels"].append(tokens.labels)
        lengths.append(len(tokens.input_ids))
    if not rows["input_ids"]:
        raise ValueError(f"no usable training rows. {report.summary()}")
    return TokenizedSplit(Dataset.from_dict(rows), report, lengths)


class SFTRecipe:
    """Load -> validate and tokenize data -> train with trl's SFTTrainer -> save model (or adapter) and tokenizer.
    The recipe never changes its config."""

    def __init__(self, config: SFTConfig):
        self.config = config
        self.model_path = resolve_tiny(config.model_name_or_path, "model")
        self.tokenizer = load_tokenizer(self.model_path, chat_template=config.chat_template)
        self.trainer: trl.SFTTrainer | None = None
        self.train_split: TokenizedSplit | None = None

    def prepare_data(self) -> tuple[Dataset, Dataset | None]:
        c = self.config
        examples, report = load_conversations(c.dataset, c)
        self.train_split = tokenize_examples(examples, report, self.tokenizer, c.max_length, c.overlong)
        logger.debug("train rows: %d kept. %s", len(self.train_split.lengths), report.summary())
        eval_dataset = None
        if c.eval_dataset:
            eval_examples, eval_report = load_conversations(c.eval_dataset, c)
            eval_dataset = tokenize_examples(eval_examples, eval_report, self.tokenizer, c.max_length, c.overlong).dataset
        return self.train_split.dataset, eval_dataset

    def build_trainer(self) -> trl.SFTTrainer:
        c = self.config
        train_dataset, eval_dataset = self.prepare_data()
        model = load_model(self.model_path, quantization=quantization_name(c), dtype=c.dtype,
                           attn_implementation=c.attn_implementation)
        self.trainer = trl.SFTTrainer(
            model=model,
            args=c,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.tokenizer,
            peft_config=trl.get_peft_config(c),
            callbacks=[RankSummaryCallback(), AtomicCheckpointCallback()] + ([LoraGradientGuard()] if c.use_peft else []),
        )
        attach_harness_eval(self.trainer, c)
        return use_console_progress(self.trainer, TrainingProgress("sft"))

    def run(self) -> dict[str, Any]:
        started = time.time()
        trainer = self.trainer or self.build_trainer()
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(self.config.resume_from_checkpoint,
                                                                        self.config.output_dir))
        out = Path(self.config.output_dir)
        trainer.save_model(str(out))  # full model, or only the adapter for LoRA / QLoRA
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            if self.config.use_peft:
                write_adapter_info(out, self.model_path, quantization_name(self.config))
        metrics: dict[str, Any] = {"train_loss": result.training_loss, "train_rows": len(self.train_split.lengths),
                                   "steps": trainer.state.global_step, "skipped": dict(self.train_split.report.counts),
                                   "train_seconds": round(time.time() - started, 1)}
        if self.config.eval_math_problems and trainer.is_world_process_zero():
            problems = generate_problems(self.config.eval_math_problems, self.config.seed, split="test")
            metrics["math_accuracy"] = math_accuracy(trainer.model, self.tokenizer, problems)
        if trainer.is_world_process_zero():
            write_metrics(out, metrics)
        return metrics


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's own parser."""
    (config,) = trl.TrlParser((SFTConfig,)).parse_args_and_config(argv)
    return config
