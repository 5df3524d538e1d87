"""The Trainer of pretraining and annealing: muP AdamW groups, a WSD schedule, a seekable data order and atomic
checkpoints, all through `transformers.Trainer`'s hooks.

- `create_optimizer`: AdamW over the muP parameter groups (`yulan_tune.training.mup`; docs/yulan_reference.md 3.1-3.2).
- `create_scheduler`: `WSDScheduler` over optimizer steps (3.4); resumable through the scheduler's state dict.
- `_get_train_sampler`: `SeekableSampler`, which yields the training rows in their fixed order starting at the row
  the restored global step points to. Exact resume therefore seeks: nothing is replayed and no consumed batch is
  read or even iterated over (the reference skipped consumed batches one by one, 3.5). Transformers' own skipping is
  turned off (`ignore_data_skip=True` is required), since the sampler is already positioned.
- `AnnealTrainer`: the same, continuing a checkpoint's AdamW moments and step count (annealing).
Checkpoints are made atomic by `yulan_tune.training.checkpoints.AtomicCheckpointCallback`.

The training rows must be a map-style dataset whose order is the training order (e.g. a `MixtureDataset`); row
`(global_step - dataset_start_step) * total_batch_size` is the first one of the step `global_step`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer

from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM
from yulan_tune.training.losses import chunked_causal_lm_loss
from yulan_tune.training.mup import mup_param_groups
from yulan_tune.training.optim_state import (
    CheckpointOptimizerState,
    OptimizerStateReport,
    hf_default_param_groups,
    load_optimizer_state,
)
from yulan_tune.training.schedules import WSDSchedule, create_wsd_scheduler

logger = logging.getLogger(__name__)


class SeekableSampler(Sampler[int]):
    """Indices `start, start + 1, ..., num_rows - 1`, with `start` read when iteration begins (after a resumed
    Trainer has restored its global step). `len()` stays the full length, as Trainer's epoch arithmetic expects."""

    def __init__(self, num_rows: int, start_row: Callable[[], int]) -> None:
        self.num_rows = num_rows
        self.start_row = start_row

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        start = self.start_row()
        if not 0 <= start <= self.num_rows:
            raise ValueError(f"resume position row {start} is outside the {self.num_rows} training rows: the "
                             f"checkpoint's step does not belong to this dataset")
        return iter(range(start, self.num_rows))


class YuLanTrainer(Trainer):
    """`transformers.Trainer` with muP AdamW, a WSD schedule and seekable data (see the module docstring).

    Args beyond Trainer's:
        schedule: the LR multiplier over optimizer steps (global steps, cumulative across phases).
        dataset_start_step: the global step at which `train_dataset`'s first row is trained on (the first step of
            this curriculum phase; 0 for a single-dataset run).
        mup: muP parameter groups (needs a yulanmini model); False gives one AdamW group per weight-decay class.
        decay_vectors: apply weight decay to biases, norms and WeSaR scalars too, as the reference did (3.2).
    """

    def __init__(self, *args: Any, schedule: WSDSchedule, dataset_start_step: int = 0, mup: bool = True,
                 decay_vectors: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.args.ignore_data_skip:
            raise ValueError("YuLanTrainer seeks its sampler to the resumed step; set ignore_data_skip=True so that "
                             "transformers does not also skip batches")
        self.schedule = schedule
        self.dataset_start_step = dataset_start_step
        self.mup = mup
        self.decay_vectors = decay_vectors

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.mup:
            groups = mup_param_groups(self.model if model is None else model, self.args.learning_rate,
                                      weight_decay=self.args.weight_decay, decay_vectors=self.decay_vectors)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
            return self.optimizer
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        # num_training_steps (this call's max_steps) is not used: the schedule spans the whole curriculum
        if self.lr_scheduler is None:
            self.lr_scheduler = create_wsd_scheduler(optimizer if optimizer is not None else self.optimizer,
                                                     self.schedule)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs and self.lr_scheduler is not None and self.lr_scheduler.base_lrs[0]:
            # "learning_rate" is the first parameter group's, i.e. the muP hidden matrices' (peak / m_width): also log
            # the schedule's multiplier, the same for every group
            logs["lr_factor"] = logs["learning_rate"] / self.lr_scheduler.base_lrs[0]
        super().log(logs, start_time)

    def first_row_of_step(self, global_step: int) -> int:
        return (global_step - self.dataset_start_step) * self.get_total_train_batch_size(self.args)

    def _get_train_sampler(self, train_dataset: Any = None) -> SeekableSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return SeekableSampler(len(dataset), lambda: self.first_row_of_step(self.state.global_step))


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
                # A second count, independent of the name matching: every optimized parameter (tied ones counted
                # once, as named_parameters() yields them) must now hold fp32-or-saved-precision moments at step S.
                optimized = [p for group in self.optimizer.param_groups for p in group["params"]]
                holding = [p for p in optimized if self.optimizer.state.get(p, {}).get("exp_avg") is not None]
                if len(holding) < len(optimized) and self.strict_optimizer_state:
                    raise ValueError(f"{saved.source}: saved moments copied into {len(holding)} of {len(optimized)} "
                                     "optimized parameters; the rest would start from zero moments. Set "
                                     "strict_optimizer_state: false to anneal anyway (listed in "
                                     "optimizer_state_report.txt)")
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
