"""lm-evaluation-harness tasks every N training steps (`eval_tasks` + `eval_every_steps` in the SFT, DPO, pretraining
and annealing configs), logged with the trainer's own metrics and into `<output_dir>/harness_eval.jsonl`.

The callback lives here, not in `training/` (a level below evaluation/, docs/architecture.md); the recipes attach it.
It must not change the training run: the tasks are built once at attach time, evaluation runs with lm-eval's global
seeding off, inside a fork of the torch / Python / NumPy RNG states, and the model goes back to training mode
(`harness.run_tasks`); a test checks that the training losses are bitwise equal with and without it.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from yulan_tune.evaluation.harness import YuLanLM, plan_tasks, run_tasks

EVAL_LOG = "harness_eval.jsonl"
PREFIX = "harness"


@dataclass
class HarnessEvalArguments:
    """The config fields, shared by SFTConfig, DPOConfig, PretrainConfig and AnnealConfig."""

    eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated lm-eval tasks (e.g. yulan_math,hellaswag) run every eval_every_steps during training"})
    eval_every_steps: int = field(default=0, metadata={"help": "run eval_tasks every N optimizer steps; 0: off"})
    eval_limit: int | None = field(default=None, metadata={"help": "at most N documents per eval_tasks task"})


def eval_task_names(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every RNG state the training run draws from, restored afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class HarnessEvalCallback(TrainerCallback):
    """Run `tasks` on the model being trained every `every_n_steps` steps (main process only)."""

    def __init__(self, tasks: str | list[str], every_n_steps: int, *, limit: int | float | None = None,
                 num_fewshot: int | None = None, include_path: str | list[str] | None = None,
                 batch_size: int = 8) -> None:
        self.tasks = eval_task_names(tasks)
        if not self.tasks or every_n_steps <= 0:
            raise ValueError("eval_tasks needs eval_every_steps > 0 (and eval_every_steps needs eval_tasks)")
        self.every_n_steps = every_n_steps
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.include_path = include_path
        self.trainer: Trainer | None = None
        self.plan = None
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Trainer) -> HarnessEvalCallback:
        """Build the tasks now (unknown names, uncached data fail before training) and join `trainer`'s callbacks."""
        if trainer.processing_class is None:
            raise ValueError("eval_tasks needs the trainer's tokenizer (processing_class)")
        self.plan = plan_tasks(self.tasks, include_path=self.include_path)
        self.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, self)  # on_log before the reporting integrations see the logs
        return self

    def evaluate(self, step: int) -> dict[str, float]:
        trainer = self.trainer
        with preserved_rng():
            lm = YuLanLM(trainer.model, trainer.processing_class, batch_size=self.batch_size)
            run = run_tasks(lm, self.plan, limit=self.limit, num_fewshot=self.num_fewshot, bootstrap_iters=0)
        metrics = {f"{PREFIX}/{key}": value for key, value in run.metrics().items()}
        with open(Path(trainer.args.output_dir) / EVAL_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self.trainer is None or state.global_step % self.every_n_steps or not state.is_world_process_zero:
            return
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        self._pending = self.evaluate(state.global_step)
        control.should_log = True  # logged with this step's training metrics (on_log below)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs: Any):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)  # what report_to (tensorboard, ...) receives
        # the Trainer stored its log_history entry before calling on_log; keep it complete
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}


def attach_harness_eval(trainer: Trainer, config: Any) -> HarnessEvalCallback | None:
    """The callback for a config's `eval_tasks` / `eval_every_steps` / `eval_limit`, attached; None when off."""
    tasks = eval_task_names(getattr(config, "eval_tasks", None))
    every = int(getattr(config, "eval_every_steps", 0) or 0)
    if not tasks and not every:
        return None
    return HarnessEvalCallback(tasks, every, limit=getattr(config, "eval_limit", None)).attach(trainer)
