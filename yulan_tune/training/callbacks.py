"""Trainer callbacks the recipes share: the console progress bar, a LoRA gradient guard, a per-rank summary."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from yulan_tune.console import progress

# logged values shown next to the bar (the full logs go to the report_to integrations and the metrics file)
_SHOWN = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr", "mean_token_accuracy": "acc"}


class TrainingProgress(TrainerCallback):
    """One progress bar with ETA for a training run, the latest loss and LR beside it, instead of transformers' bar
    that also writes every log dict as a line (per-layer monitor statistics would fill the screen).

    With `total`, the bar spans several `Trainer.train()` calls (the phases of a curriculum) and stays open until
    `close()`; without, it spans one call (`state.max_steps`)."""

    def __init__(self, description: str, total: int | None = None) -> None:
        self.description = description
        self.total = total
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.bar is None:
            self.bar = progress(total=self.total or state.max_steps, initial=state.global_step, desc=self.description,
                                unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "train_runtime" in logs:  # the end-of-run summary has no step loss
            return
        shown = {label: f"{logs[key]:.4g}" for key, label in _SHOWN.items() if isinstance(logs.get(key), (int, float))}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.total is None:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_console_progress(trainer: Trainer, bar: TrainingProgress) -> Trainer:
    """Replace the Trainer's default console output (a bar that also prints every log dict, or with `disable_tqdm`
    a print of every log dict) with `bar`, or with nothing when `disable_tqdm` is set."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(bar)
    return trainer


def converted_for_cpu_inference(model: torch.nn.Module) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes has rewritten into its CPU inference layout (the
    `packing_format_for_cpu` flag of their quant state), which its training path does not handle."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


class LoraGradientGuard(TrainerCallback):
    """Stops a LoRA run that would train silently wrong, instead of letting it train nothing.

    bitsandbytes on CPU rewrites 4-bit weights in place into an inference layout on the first eval-mode no-grad
    forward (on CPUs with AVX512-BF16), after which training either gets LoRA gradients of exactly zero or fails
    inside bitsandbytes (docs/stack_notes.md, trap 1). At the start of training the guard refuses a model with
    converted layers; at the first optimizer step it refuses LoRA gradients that are all zero (lora_B starts at
    zero, so its gradient is the one that must be non-zero at step one), whatever the cause.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        converted = converted_for_cpu_inference(model) if model is not None else []
        if converted:
            raise RuntimeError(
                f"{len(converted)} 4-bit layers (e.g. {converted[0]}) were converted to bitsandbytes' CPU inference "
                "layout by an eval/no-grad forward before training; training them would give wrong gradients. "
                "Reload the model before training it (docs/stack_notes.md, bitsandbytes trap 1)."
            )

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
    """With several processes (DDP / FSDP / DeepSpeed), each prints what it did at the end of training: this shows
    that every rank trained, and that they ended on the same weights. A single process prints nothing."""

    def on_train_end(self, args: Any, state, control, model=None, **kwargs):
        if args.world_size < 2:
            return
        checksum = sum(float(p.detach().float().sum()) for p in model.parameters() if p.requires_grad) if model else 0.0
        # one write with its newline: ranks share stdout, and print's separate "\n" write can interleave
        line = (f"rank {args.process_index}/{args.world_size}: steps={state.global_step} "
                f"trainable_checksum={checksum:.6e}")
        print(line + "\n", end="", flush=True)
