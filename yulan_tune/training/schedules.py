"""Warmup-stable-decay (WSD) learning-rate schedules, as YuLan-Mini used them (docs/yulan_reference.md 3.4).

The multiplier applied to every parameter group's peak LR at optimizer step `t` (steps counted from `start_step`,
`s = t - start_step`) is

    warmup   s < W:              lambda = s / W                           (linear 0 -> 1, as the reference)
    stable   W <= s < W + S:     lambda = 1
    decay    p = (s - W - S) / D, clamped to [0, 1]:
                                 lambda = end + (1 - end) * f(p)

with the decay shapes f of the reference's `train_utils.py:63-154`, rewritten for an end value:

    "cosine" ("cos")          f = cos(pi p / 2)          quarter cosine: the reference's default `cos`
    "cos2" ("half-cosine")    f = (1 + cos(pi p)) / 2    the usual half-period cosine decay
    "linear"                  f = 1 - p
    "1-sqrt" ("1sqrt")        f = 1 - sqrt(p)            what YuLan-Mini's annealing used (3.4, 4)

After the decay window the multiplier stays at `end`. The reference instead falls back to lambda = 1 after its
window (only its 1-sqrt branch clamps the step, at a hard-coded 262000), which silently jumps back to the peak LR;
here every shape is clamped. `stable_steps=None` means "stable until the run ends": YuLan's 25 stable phases run
with no decay and the decay is scheduled later by annealing from a checkpoint (`start_step` = that step).

Pretraining and annealing both build a `WSDSchedule` (in steps, or in tokens via `WSDSchedule.from_tokens`) and
wrap it in `WSDScheduler`, a `LambdaLR` that stores the schedule in its state dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

DECAY_SHAPES = ("cosine", "cos2", "linear", "1-sqrt")
# other spellings users meet: the reference's names and descriptive ones
_SHAPE_ALIASES = {"cos": "cosine", "quarter-cosine": "cosine", "half-cosine": "cos2", "1sqrt": "1-sqrt"}


def canonical_decay_shape(shape: str) -> str:
    """The canonical name of a decay shape, accepting the reference's spellings ("cos", "1sqrt")."""
    name = _SHAPE_ALIASES.get(shape, shape)
    if name not in DECAY_SHAPES:
        known = ", ".join([*DECAY_SHAPES, *_SHAPE_ALIASES])
        raise ValueError(f"unknown decay shape {shape!r}; expected one of: {known}")
    return name


def decay_curve(progress: float, shape: str) -> float:
    """f(p) of the module docstring: 1 at the start of the decay window (p=0), 0 at its end (p=1)."""
    p = min(max(progress, 0.0), 1.0)
    shape = canonical_decay_shape(shape)
    if shape == "cosine":
        return math.cos(math.pi * p / 2)
    if shape == "cos2":
        return (1.0 + math.cos(math.pi * p)) / 2
    if shape == "linear":
        return 1.0 - p
    return 1.0 - math.sqrt(p)  # "1-sqrt"


def wsd_lambda(
    step: int,
    *,
    warmup_steps: int,
    stable_steps: int | None,
    decay_steps: int,
    decay_shape: str = "1-sqrt",
    start_step: int = 0,
    end_lr_factor: float = 0.0,
) -> float:
    """LR multiplier at optimizer step `step` (see the module docstring for the formula)."""
    s = max(step - start_step, 0)
    if s < warmup_steps:
        return s / warmup_steps
    if stable_steps is None:
        return 1.0
    into_decay = s - warmup_steps - stable_steps
    if into_decay < 0:
        return 1.0
    if decay_steps <= 0:  # no decay window: the run ends at the end value
        return end_lr_factor
    return end_lr_factor + (1.0 - end_lr_factor) * decay_curve(into_decay / decay_steps, decay_shape)


@dataclass(frozen=True)
class WSDSchedule:
    """A warmup-stable-decay multiplier, callable as `LambdaLR`'s `lr_lambda` (steps are optimizer steps)."""

    warmup_steps: int = 0
    stable_steps: int | None = None  # None: stable until the run ends (no decay window)
    decay_steps: int = 0
    decay_shape: str = "1-sqrt"
    start_step: int = 0
    end_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay_shape", canonical_decay_shape(self.decay_shape))
        for name in ("warmup_steps", "decay_steps", "start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"WSDSchedule.{name} must be >= 0, got {getattr(self, name)}")
        if self.stable_steps is not None and self.stable_steps < 0:
            raise ValueError(f"WSDSchedule.stable_steps must be >= 0 or None, got {self.stable_steps}")
        if self.stable_steps is None and self.decay_steps:
            raise ValueError("WSDSchedule: a decay window needs stable_steps (None means stable until the end)")
        if not 0.0 <= self.end_lr_factor <= 1.0:
            raise ValueError(f"WSDSchedule.end_lr_factor must be in [0, 1], got {self.end_lr_factor}")

    def __call__(self, step: int) -> float:
        return wsd_lambda(
            step,
            warmup_steps=self.warmup_steps,
            stable_steps=self.stable_steps,
            decay_steps=self.decay_steps,
            decay_shape=self.decay_shape,
            start_step=self.start_step,
            end_lr_factor=self.end_lr_factor,
        )

    @property
    def decay_start_step(self) -> int | None:
        return None if self.stable_steps is None else self.start_step + self.warmup_steps + self.stable_steps

    @property
    def end_step(self) -> int | None:
        """First step at which the multiplier has reached `end_lr_factor` (None without a decay window)."""
        start = self.decay_start_step
        return None if start is None else start + self.decay_steps

    @classmethod
    def from_tokens(
        cls,
        *,
        tokens_per_step: int,
        warmup_tokens: int = 0,
        stable_tokens: int | None = None,
        decay_tokens: int = 0,
        decay_shape: str = "1-sqrt",
        start_step: int = 0,
        end_lr_factor: float = 0.0,
    ) -> "WSDSchedule":
        """The same schedule with its windows given in tokens; each window becomes ceil(tokens / tokens_per_step)
        steps, so a window never ends before its token budget is consumed (exact when the budget divides)."""
        if tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step}")

        def steps(tokens: int) -> int:
            return -(-int(tokens) // tokens_per_step)

        return cls(
            warmup_steps=steps(warmup_tokens),
            stable_steps=None if stable_tokens is None else steps(stable_tokens),
            decay_steps=steps(decay_tokens),
            decay_shape=decay_shape,
            start_step=start_step,
            end_lr_factor=end_lr_factor,
        )


class WSDScheduler(LambdaLR):
    """`LambdaLR` driven by a `WSDSchedule`, resumable through its state dict.

    The state dict holds the step counter and the schedule. On load the step is restored; the schedule given to
    the constructor (the current config) stays in force, and a warning says so when it differs from the saved one,
    because the LR then jumps at the resume step. An unchanged config resumes with exactly the same LR.
    """

    def __init__(self, optimizer: Optimizer, schedule: WSDSchedule, last_epoch: int = -1) -> None:
        self.schedule = schedule
        super().__init__(optimizer, lr_lambda=schedule, last_epoch=last_epoch)

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_lambdas", "schedule")}
        state["schedule"] = dataclasses.asdict(self.schedule)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("schedule", None)
        state.pop("lr_lambdas", None)  # a plain LambdaLR state dict: only the counters matter
        self.__dict__.update(state)
        if saved is not None and WSDSchedule(**saved) != self.schedule:
            logger.warning(
                "resuming with a different LR schedule than the checkpoint's: saved %s, now %s; the LR at step %d "
                "changes from %.4g to %.4g of the peak",
                saved, dataclasses.asdict(self.schedule), self.last_epoch,
                WSDSchedule(**saved)(self.last_epoch), self.schedule(self.last_epoch),
            )


def create_wsd_scheduler(optimizer: Optimizer, schedule: WSDSchedule, last_step: int = -1) -> WSDScheduler:
    """Factory used by the trainers: `last_step=-1` starts fresh (first `step()` gives step 0's LR)."""
    if last_step >= 0:
        for group in optimizer.param_groups:  # LambdaLR requires initial_lr when not starting fresh
            group.setdefault("initial_lr", group["lr"])
    return WSDScheduler(optimizer, schedule, last_epoch=last_step)
