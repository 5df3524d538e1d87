"""Reinforcement learning with verifiable rewards: `GRPOConfig` (trl's, plus model / data / reward fields) and
`GRPORecipe`.

    from yulan_tune import GRPOConfig, GRPORecipe
    GRPORecipe(GRPOConfig(model_name_or_path="outputs/quickstart/model", output_dir="out")).run()

The policy samples `num_generations` completions per prompt (vLLM where installed and a GPU is present, else
transformers' generate), each is scored by the reward terms of `yulan_tune.evaluation.rewards` (math answer, code
tests, format, YuLan-Mini-Instruct's penalties for truncated, mixed-language and one-sentence answers, or a reward
model clipped to (-20, 10)), and trl's GRPOTrainer turns the group-normalized rewards into advantages. The KL term
against the starting model is trl's `beta` (per-token k3 estimate); with `kl_target` it is adapted as in
YuLan-Mini-Instruct's PPO (`training.kl_control.AdaptiveKLController`). LoRA / QLoRA through trl's `ModelConfig`.

PPO itself is not available: trl 1.16 has no PPOTrainer (moved to `trl.experimental.ppo` in 1.10, removed after);
see docs/rl.md for which parts of the report's PPO setup this recipe reproduces.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedModel

from yulan_tune.console import write_metrics
from yulan_tune.data.bundled import MATH_CHAT
from yulan_tune.data.chat import end_of_turn_ids
from yulan_tune.data.math_problems import TRAIN_POOL, MathProblem, generate_problems, solutions
from yulan_tune.data.prompts import PromptExample, load_prompts
from yulan_tune.data.records import SkipReport
from yulan_tune.evaluation.exact_match import math_correct
from yulan_tune.evaluation.paired import compare_paired
from yulan_tune.evaluation.rewards import (
    REWARD_TERMS,
    ArithmeticReward,
    CodeTestsReward,
    FormatReward,
    MathAnswerReward,
    MixedLanguagePenalty,
    OneSentencePenalty,
    RewardModelScore,
    TruncationPenalty,
)
from yulan_tune.export import write_adapter_info
from yulan_tune.loading import load_model, load_tokenizer, quantization_name
from yulan_tune.tiny import resolve_tiny
from yulan_tune.training.callbacks import LoraGradientGuard, TrainingProgress, use_console_progress
from yulan_tune.training.checkpoints import AtomicCheckpointCallback, resume_checkpoint
from yulan_tune.training.kl_control import AdaptiveKLController
from yulan_tune.training.post_training import PostTrainingModelConfig, resolve_cpu_precision

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@dataclass
class GRPOConfig(trl.GRPOConfig, PostTrainingModelConfig):
    """trl.GRPOConfig plus trl.ModelConfig and what a recipe needs; every field can be set in YAML or overridden on
    the command line."""

    model_name_or_path: str = field(default="tiny", metadata={"help": "the policy to start from: hub id, dir, 'tiny'"})
    dataset: str = field(default=MATH_CHAT, metadata={
        "help": f"prompts (prompt/messages/question + answer and/or tests) or '{MATH_CHAT}' (bundled problems)"})
    dataset_split: str = field(default="train", metadata={"help": "split to read from dataset dirs / hub datasets"})
    num_bundled_prompts: int = field(default=1000, metadata={"help": f"prompts generated for {MATH_CHAT}"})
    first_bundled_prompt: int = field(default=0, metadata={
        "help": f"index of the first {MATH_CHAT} train problem used, so RL can draw prompts an earlier stage did not "
                "see (grpo_tiny.yaml starts after the on-policy pairs' prompts)"})
    rewards: list[str] = field(default_factory=lambda: ["math", "format", "truncation", "one_sentence",
                                                        "mixed_language"], metadata={
        "help": f"reward terms, any of {list(REWARD_TERMS)}; weights in reward_weights (same order; reward_model "
                "comes last when set)"})
    reward_model: str | None = field(default=None, metadata={
        "help": "a sequence-classification reward model (dir or hub id) added as a reward term"})
    reward_clip: list[float] = field(default_factory=lambda: [-20.0, 10.0], metadata={
        "help": "clip range of the reward model's score (YuLan-Mini-Instruct PPO: -20 10)"})
    allow_code_execution: bool = field(default=False, metadata={
        "help": "run generated programs against the rows' tests (the 'code' reward), in a limited subprocess"})
    mixed_language_min_share: float = field(default=0.2, metadata={
        "help": "share of the minority script (CJK vs Latin words) from which an answer counts as mixed"})
    kl_target: float | None = field(default=None, metadata={
        "help": "adaptive KL: the target KL (YuLan: 0.06); beta is the initial coefficient. None: beta fixed"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon in samples (OpenRLHF's default)"})
    eval_math_problems: int = field(default=0, metadata={
        "help": "if > 0, held-out math exact-match before and after training on this many bundled problems"})
    # the adaptive KL controller is a stateful callback: restore its coefficient on resume (transformers' default
    # restores no callback state)
    restore_callback_states_from_checkpoint: bool = True
    use_vllm: bool | None = field(default=None, metadata={
        "help": "generate with vLLM; default: where vllm is installed and CUDA is available"})
    gradient_checkpointing: bool | None = None
    activation_checkpointing: bool | None = None
    use_liger_kernel: bool | None = None

    def __post_init__(self):
        resolve_cpu_precision(self)
        if self.use_vllm is None:
            self.use_vllm = vllm_available()
        unknown = sorted(set(self.rewards) - set(REWARD_TERMS))
        if unknown:
            raise ValueError(f"rewards: unknown terms {unknown}; expected any of {list(REWARD_TERMS)}")
        if "code" in self.rewards and not self.allow_code_execution:
            raise ValueError("rewards: 'code' runs generated programs; pass allow_code_execution: true to opt in")
        if not self.rewards and not self.reward_model:
            raise ValueError("no reward: set rewards and/or reward_model")
        if self.dataset == MATH_CHAT and not 0 <= self.first_bundled_prompt <= TRAIN_POOL - self.num_bundled_prompts:
            raise ValueError(f"first_bundled_prompt {self.first_bundled_prompt} + num_bundled_prompts "
                             f"{self.num_bundled_prompts}: {MATH_CHAT} holds train problems 0..{TRAIN_POOL - 1}")
        if len(self.reward_clip) != 2 or self.reward_clip[0] >= self.reward_clip[1]:
            raise ValueError(f"reward_clip must be [low, high] with low < high, got {self.reward_clip}")
        if self.kl_target is not None and (self.kl_target <= 0 or self.beta <= 0):
            raise ValueError(f"adaptive KL (kl_target {self.kl_target}) needs kl_target > 0 and an initial beta > 0 "
                             f"(got beta {self.beta})")
        self.resolve_model_fields()
        super().__post_init__()
        n_terms = len(self.rewards) + bool(self.reward_model)
        if self.reward_weights is not None and len(self.reward_weights) != n_terms:
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {n_terms} reward terms "
                             f"({self.rewards + (['reward_model'] if self.reward_model else [])})")


class YuLanGRPOTrainer(trl.GRPOTrainer):
    """trl's GRPOTrainer whose KL coefficient follows an `AdaptiveKLController` callback, when one is attached: read
    before each step, updated from each logged KL (the mean over the steps since the previous log)."""

    def kl_controller(self) -> AdaptiveKLController | None:
        # looked up each time: on resume transformers replaces a stateful callback by a restored copy
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaptiveKLController)), None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        controller = self.kl_controller()
        if controller is not None:
            self.beta = controller.value
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)  # fills `logs` with the averaged trl metrics, "kl" among them
        controller = self.kl_controller()
        if controller is None or not self.model.training or logs.get("kl") is None or "loss" not in logs:
            return
        samples = self.state.global_step * self.args.generation_batch_size * self.accelerator.num_processes
        new_samples = samples - controller.samples_seen
        if new_samples > 0:
            self.beta = controller.update(float(logs["kl"]), new_samples)
            # Trainer.log appended a copy of `logs` to the history already: record the new coefficient there too
            logs["beta"] = self.state.log_history[-1]["beta"] = self.beta


def build_reward_terms(config: GRPOConfig, tokenizer: Any) -> list[Any]:
    """The reward callables in `config.rewards` order, the reward model last."""
    makers = {
        "math": MathAnswerReward,
        "code": CodeTestsReward,
        "format": FormatReward,
        "arithmetic": ArithmeticReward,
        "truncation": lambda: TruncationPenalty(end_of_turn_ids(tokenizer)),
        "mixed_language": lambda: MixedLanguagePenalty(config.mixed_language_min_share),
        "one_sentence": OneSentencePenalty,
    }
    terms = [makers[name]() for name in config.rewards]
    if config.reward_model:
        terms.append(RewardModelScore(config.reward_model, clip=tuple(config.reward_clip)))
    return terms


def prompts_dataset(prompts: list[PromptExample]) -> Dataset:
    """trl's conversational prompt rows, with the verifiable references as columns the reward terms read."""
    return Dataset.from_dict({"prompt": [p.prompt for p in prompts], "answer": [p.answer or "" for p in prompts],
                              "tests": [p.tests or "" for p in prompts]})


class GRPORecipe:
    """Load prompts -> policy (+ LoRA) -> reward terms -> trl GRPOTrainer -> measure before / after -> save."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.model_path = resolve_tiny(config.model_name_or_path, "model")
        self.tokenizer = load_tokenizer(self.model_path, chat_template=config.chat_template)
        self.trainer: YuLanGRPOTrainer | None = None
        self.prompts: list[PromptExample] = []
        self.report = SkipReport()

    def prepare_data(self) -> Dataset:
        c = self.config
        self.prompts, self.report = load_prompts(c.dataset, on_bad_rows=c.on_bad_rows, split=c.dataset_split,
                                                 columns=c.columns, num_bundled=c.num_bundled_prompts, seed=c.seed,
                                                 first_bundled=c.first_bundled_prompt)
        if not self.prompts:
            raise ValueError(f"{c.dataset}: no usable prompts. {self.report.summary()}")
        if "math" in c.rewards and not any(p.answer for p in self.prompts):
            raise ValueError(f"{c.dataset}: the 'math' reward needs an 'answer' column; no row has one")
        if "code" in c.rewards and not any(p.tests for p in self.prompts):
            raise ValueError(f"{c.dataset}: the 'code' reward needs a 'tests' column; no row has one")
        return prompts_dataset(self.prompts)

    def _load(self) -> PreTrainedModel:
        c = self.config
        model = load_model(self.model_path, quantization=quantization_name(c), dtype=c.dtype,
                           attn_implementation=c.attn_implementation)
        # sampling stops at the end of the assistant turn (trl reads the stop ids from the generation config)
        model.generation_config.eos_token_id = end_of_turn_ids(self.tokenizer)
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def build_trainer(self) -> YuLanGRPOTrainer:
        c = self.config
        dataset = self.prepare_data()
        model = self._load()
        # each checkpoint gets a completion record, so `resume_from_checkpoint: true` finds the last complete one
        callbacks: list[Any] = [AtomicCheckpointCallback()] + ([LoraGradientGuard()] if c.use_peft else [])
        if c.kl_target is not None:
            callbacks.append(AdaptiveKLController(c.beta, c.kl_target, c.kl_horizon))
        self.trainer = YuLanGRPOTrainer(model=model, reward_funcs=build_reward_terms(c, self.tokenizer), args=c,
                                        train_dataset=dataset, processing_class=self.tokenizer,
                                        peft_config=trl.get_peft_config(c), callbacks=callbacks or None)
        return use_console_progress(self.trainer, TrainingProgress("grpo"))

    def math_problems(self) -> list[MathProblem]:
        return generate_problems(self.config.eval_math_problems, self.config.seed, split="test")

    def math_correct(self, model: PreTrainedModel) -> list[bool]:
        return math_correct(model, self.tokenizer, self.math_problems())

    def run(self) -> dict[str, Any]:
        c = self.config
        started = time.time()
        trainer = self.trainer or self.build_trainer()
        metrics: dict[str, Any] = {"rewards": list(c.rewards) + (["reward_model"] if c.reward_model else [])}
        resume = resume_checkpoint(c.resume_from_checkpoint, c.output_dir)
        correct_before = None
        quantized_on_cpu = (c.load_in_4bit or c.load_in_8bit) and not torch.cuda.is_available()
        # no eval-mode forward on a 4-bit model before training on CPU (bitsandbytes trap 1, docs/stack_notes.md)
        if c.eval_math_problems and resume is None and not quantized_on_cpu and trainer.is_world_process_zero():
            correct_before = self.math_correct(trainer.model)
            metrics["math_accuracy_before"] = sum(correct_before) / len(correct_before)
        result = trainer.train(resume_from_checkpoint=resume)
        history = [log for log in trainer.state.log_history if "reward" in log]
        metrics.update(train_loss=result.training_loss, prompts=len(self.prompts), steps=trainer.state.global_step,
                       skipped=dict(self.report.counts), resumed_from=resume, final_beta=trainer.beta,
                       reward_first=history[0]["reward"] if history else None,
                       reward_last=history[-1]["reward"] if history else None,
                       train_seconds=round(time.time() - started, 1))
        out = Path(c.output_dir)
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(str(out))
            if c.use_peft:
                write_adapter_info(out, self.model_path, quantization_name(c))
            if c.eval_math_problems:
                correct_after = self.math_correct(trainer.model)
                metrics["math_accuracy_after"] = sum(correct_after) / len(correct_after)
                if correct_before is not None:
                    clusters = solutions(self.math_problems())  # problems with the same worked solution
                    metrics["math_paired"] = compare_paired(correct_before, correct_after, clusters=clusters).as_dict()
            write_metrics(out, metrics)
        return metrics


def parse_config(argv: list[str] | None = None) -> GRPOConfig:
    """`--config file.yaml` plus any `--field value` overrides, through trl's own parser."""
    (config,) = trl.TrlParser((GRPOConfig,)).parse_args_and_config(argv)
    return config
