"""The Trainer of pretraining and annealing: muP AdamW groups, a WSD schedule, a seekable data order and atomic
checkpoints, all through `transformers.Trainer`'s hooks.

- `create_optimizer`: AdamW over the muP parameter groups (`yulan_tune.training.mup`; yulan_reference.md 3.1-3.2).
- `create_scheduler`: `WSDScheduler` over optimizer steps (3.4); resumable through the scheduler's state dict.
- `_get_train_sampler`: `SeekableSampler`, which yields the training rows in their fixed order starting at the row
  the restored global step points to. Exact resume therefore seeks: nothing is replayed and no consumed batch is
  read or even iterated over (the reference skipped consumed batches one by one, 3.5). Transformers' own skipping is
  turned off (`ignore_data_skip=True` is required), since the sampler is already positioned.
- `AtomicCheckpointCallback`: a checkpoint counts only once a completion record is written after all its files are
  flushed to disk (`CHECKPOINT_COMPLETE`). A run killed while saving leaves a directory without it, which
  `latest_complete_checkpoint` never returns and `remove_incomplete_checkpoints` clears.

The training rows must be a map-style dataset whose order is the training order (e.g. a `MixtureDataset`); row
`(global_step - dataset_start_step) * total_batch_size` is the first one of the step `global_step`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from yulan_tune.training.schedules import WSDSchedule, create_wsd_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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
            from yulan_tune.training.mup import mup_param_groups

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


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def read_checkpoint_record(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The completion record of a checkpoint, or None when it is incomplete (no record, or a file is missing or has
    another size than recorded)."""
    checkpoint = Path(checkpoint)
    record_path = checkpoint / CHECKPOINT_COMPLETE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, size in record.get("files", {}).items():
        file = checkpoint / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return record


def list_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint directories of `output_dir`, each sorted by step."""
    output_dir = Path(output_dir)
    found = sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step)
    complete = [p for p in found if read_checkpoint_record(p) is not None]
    return complete, [p for p in found if p not in complete]


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    complete, _ = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete checkpoint directories that were never completed (a run killed while saving); returns them."""
    _, incomplete = list_checkpoints(output_dir)
    for path in incomplete:
        logger.warning("removing incomplete checkpoint %s (the run stopped while writing it)", path)
        shutil.rmtree(path)
    return incomplete


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint_record(checkpoint: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Flush every file of `checkpoint` to disk, then atomically write its completion record (temp file, fsync,
    rename, directory fsync): the record exists only if everything it lists does."""
    files = {}
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_COMPLETE):
        _fsync(file)
        files[str(file.relative_to(checkpoint))] = file.stat().st_size
    record = {**extra, "files": files}
    tmp = checkpoint / (CHECKPOINT_COMPLETE + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / CHECKPOINT_COMPLETE)
    _fsync(checkpoint)
    return record


class AtomicCheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete after Trainer wrote it, then keeps the `keep_last` newest complete ones (plus
    any whose record says `"keep": true`, e.g. the last checkpoint of each curriculum phase).

    Transformers writes `checkpoint-N` in place; this callback's `on_save` runs after every file is written. Rotation
    is done here, after the record, instead of by `save_total_limit` (which deletes old checkpoints before the new one
    is known to be complete), so the config must leave `save_total_limit` unset.
    `record_extra(state)` adds fields to the record (the recipe stores its curriculum position there).
    """

    def __init__(self, keep_last: int | None = None,
                 record_extra: Callable[[TrainerState], dict[str, Any]] | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.keep_last = keep_last
        self.record_extra = record_extra

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank has written its part (DeepSpeed / FSDP shards)
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            extra = {"global_step": state.global_step, **(self.record_extra(state) if self.record_extra else {})}
            write_checkpoint_record(checkpoint, extra)
            self._rotate(Path(args.output_dir))
        PartialState().wait_for_everyone()

    def _rotate(self, output_dir: Path) -> None:
        if self.keep_last is None:
            return
        complete, _ = list_checkpoints(output_dir)
        for path in complete[: max(len(complete) - self.keep_last, 0)]:
            if not read_checkpoint_record(path).get("keep"):
                shutil.rmtree(path)
