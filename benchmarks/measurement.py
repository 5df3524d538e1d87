"""Measuring one training run, without changing what it trains: the tokens each optimizer step trained (counted
from the very batches the trainer consumed, so each variant is credited with exactly what it trained), the time of
each step, and the peak memory of the training window (RSS on CPU, torch's allocator peak on CUDA).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yulan_tune.conventions import IGNORE_INDEX

# ----------------------------------------------------------------------------------------- counting what is trained


@dataclass
class BatchStats:
    trained_tokens: int  # positions whose next-token prediction enters the loss
    input_tokens: int  # non-pad tokens the model ran on (prompt tokens included)
    sequence_lengths: list[int]  # attention spans (documents) in the batch, for the attention FLOPs


def batch_stats(batch: dict[str, Any]) -> BatchStats:
    """What one collated batch trains, from the tensors the model receives.

    SFT / LM batches: `labels` (-100 = not trained; a row's first label is never predicted, so it is left out).
    DPO batches: `completion_mask` (every completion token is predicted from the token before it).
    Padded batches carry `attention_mask`; padding-free ones carry `position_ids` restarting at each document.
    """
    if "completion_mask" in batch:
        trained = int(batch["completion_mask"].sum())
    elif "labels" in batch:
        trained = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    else:
        raise KeyError(f"a batch needs 'labels' or 'completion_mask' to count trained tokens, got {sorted(batch)}")
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        lengths = [int(n) for n in batch["attention_mask"].sum(-1).flatten().tolist()]
    elif "position_ids" in batch:
        lengths = []
        for row in batch["position_ids"].reshape(-1, batch["position_ids"].shape[-1]):
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    else:
        ids = batch["input_ids"]
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    return BatchStats(trained, sum(lengths), lengths)


class CountingCollator:
    """Wraps a data collator and records the `BatchStats` of every batch it builds, in order.

    With one batch per optimizer step (gradient_accumulation_steps 1, dataloader_num_workers 0), batch i is the
    batch of step i; the dataloader may build one batch ahead, which the step window below never reads.
    """

    def __init__(self, collator: Callable[[list[dict]], dict[str, Any]]):
        self.collator = collator
        self.batches: list[BatchStats] = []

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        self.batches.append(batch_stats(batch))
        return batch


class StepClock:
    """Wall and process-CPU time at the end of every optimizer step (the GPU is synchronized first, so a step's
    time includes its kernels). Process CPU time sums all threads: on a shared CPU it is less disturbed by other
    processes than wall time, so it is reported beside it."""

    def __init__(self, synchronize: bool):
        self.synchronize = synchronize
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def trainer_step_callback(clock: StepClock) -> Any:
    """A transformers TrainerCallback that ticks `clock` at every optimizer step's end."""
    from transformers import TrainerCallback

    class _StepClockCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return _StepClockCallback()


@dataclass
class Measurement:
    """Counting and timing of one training run; `summary` turns them into the run's numbers."""

    device: str
    counter: CountingCollator | None = None
    clock: StepClock = field(default_factory=lambda: StepClock(False))
    batches: list[BatchStats] = field(default_factory=list)  # filled directly by loops without a collator

    def all_batches(self) -> list[BatchStats]:
        return self.counter.batches if self.counter is not None else self.batches

    def summary(self, warmup_steps: int) -> dict[str, Any]:
        """Numbers over steps warmup_steps+1 .. last: from the end of the last warmup step to the end of the run."""
        steps = len(self.clock.wall)
        if steps <= warmup_steps:
            raise RuntimeError(f"the run made {steps} optimizer steps, not more than warmup_steps={warmup_steps}")
        batches = self.all_batches()
        if len(batches) < steps:
            raise RuntimeError(f"{steps} steps but only {len(batches)} counted batches: is gradient accumulation or "
                               "a dataloader worker hiding batches from the counter?")
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be at least 1: the window starts at the end of the last warmup step")
        measured = batches[warmup_steps:steps]
        wall = self.clock.wall[-1] - self.clock.wall[warmup_steps - 1]
        cpu = self.clock.cpu[-1] - self.clock.cpu[warmup_steps - 1]
        trained = sum(b.trained_tokens for b in measured)
        processed = sum(b.input_tokens for b in measured)
        return {
            "steps_measured": steps - warmup_steps,
            "trained_tokens": trained,
            "input_tokens": processed,
            "wall_s": wall,
            "cpu_s": cpu,
            "trained_tokens_per_s": trained / wall,
            "input_tokens_per_s": processed / wall,
            "trained_tokens_per_cpu_s": trained / cpu if cpu else None,
            "sequence_lengths": [n for b in measured for n in b.sequence_lengths],
        }


def instrument_trainer(trainer: Any, device: str) -> Measurement:
    """Count the batches a transformers/trl Trainer trains on and time its steps, without changing what it does."""
    if trainer.args.gradient_accumulation_steps != 1 or trainer.args.dataloader_num_workers != 0:
        raise ValueError("benchmarks count one batch per step: use gradient_accumulation_steps 1 and "
                         "dataloader_num_workers 0")
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock(synchronize=device == "cuda")
    trainer.add_callback(trainer_step_callback(clock))
    return Measurement(device=device, counter=counter, clock=clock)


def measure_training(trainer: Any, device: str, warmup_steps: int) -> dict[str, Any]:
    """Train `trainer` once inside a fresh peak-memory window: the timing of the steps after `warmup_steps`, peak
    memory, and the precision / checkpointing / kernel options the run really used."""
    measurement = instrument_trainer(trainer, device)
    rss_before = current_rss_mib()
    reset_peak_memory(device)
    train_output = trainer.train()
    return {**measurement.summary(warmup_steps), **peak_memory(device), "rss_before_train_mib": rss_before,
            "train_loss": train_output.training_loss, "bf16": bool(trainer.args.bf16),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "liger": bool(trainer.args.use_liger_kernel), "torch_compile": bool(trainer.args.torch_compile),
            "param_dtype": str(next(trainer.model.parameters()).dtype)}


# ----------------------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's resident-set high-water mark (Linux
    resets VmHWM when 5 is written to /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not permitted: the window then starts at process start (ru_maxrss), said in the result


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory since `reset_peak_memory`: GPU bytes allocated by torch on CUDA, resident set size on CPU."""
    out = {"peak_rss_lifetime_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    out.setdefault("peak_rss_mib", out["peak_rss_lifetime_mib"])
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out
