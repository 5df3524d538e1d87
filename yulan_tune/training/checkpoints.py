"""Checkpoints: atomic completion records, finding the newest complete one, and finding the pre-annealing checkpoint
(weights + optimizer state) a user points at.

A checkpoint counts only once a completion record is written after all its files are flushed to disk
(`CHECKPOINT_COMPLETE`, written by `AtomicCheckpointCallback`). A run killed while saving leaves a directory
without it, which `latest_complete_checkpoint` never returns and `remove_incomplete_checkpoints` clears.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from yulan_tune.training.optim_state import choose_universal_checkpoint, has_universal_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def check_keep_steps(steps: list[int] | None, name: str = "keep_checkpoint_steps") -> list[int]:
    """`steps` as a sorted list of distinct positive step numbers (a config's list of checkpoints to keep)."""
    if not steps:
        return []
    if isinstance(steps, (int, str)):
        steps = [steps]
    try:
        values = sorted({int(step) for step in steps})
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of step numbers, got {steps!r}") from None
    if values[0] < 1:
        raise ValueError(f"{name}: steps start at 1, got {values[0]}")
    return values


class SaveAtSteps(TrainerCallback):
    """Saves a checkpoint at each of `steps` (optimizer steps as the Trainer counts them, i.e. the `checkpoint-N`
    names), in addition to the `save_steps` schedule: a series of checkpoints to study (`yulan-tune dynamics`)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = frozenset(check_keep_steps(steps))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if state.global_step in self.steps:
            control.should_save = True
        return control


# ---------------------------------------------------------------------------------------------------- anneal sources


# Hub repositories whose step folder is documented: YuLan-Mini's README anneals from step 243198, and the
# Before-Annealing repository has held global_step262772_universal (its first latest_universal) next to
# global_step243198_universal ("Upload correct optimizer states"), docs/yulan_reference.md 4.
DOCUMENTED_OPTIMIZER_STEPS = {"yulan-team/YuLan-Mini-Before-Annealing": 243198}


@dataclass
class AnnealSource:
    """Where the pre-annealing model and its optimizer state live (both only read)."""

    model_dir: Path
    optimizer_dir: Path | None  # HF checkpoint-N dir or DeepSpeed universal folder; None: fresh moments
    optimizer_step: int | None = None  # the step folder asked for (optimizer_state_step or the documented one)
    optimizer_choice: str | None = None  # why that folder (several global_step*_universal folders)


def _latest_trainer_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint-N of a training output dir: the newest complete one when the run wrote completion
    records (PretrainRecipe's atomic checkpoints), else the highest-numbered one with an optimizer.pt."""
    complete = latest_complete_checkpoint(path)
    if complete is not None:
        return complete
    found = sorted((int(p.name.split("-")[1]), p) for p in path.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / "optimizer.pt").is_file())
    return found[-1][1] if found else None


def resume_checkpoint(resume_from_checkpoint: Any, output_dir: str | os.PathLike) -> str | None:
    """What a recipe passes to `Trainer.train(resume_from_checkpoint=...)`: a path as given; `true` (or "last") the
    newest complete checkpoint of `output_dir` (Trainer's own `true` takes the newest directory, even one a kill left
    half-written), else None."""
    value = resume_from_checkpoint
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True", "last"):
        last = _latest_trainer_checkpoint(Path(output_dir)) if Path(output_dir).is_dir() else None
        return str(last) if last is not None else None
    return str(value)


def resolve_source(name_or_path: str, optimizer_state: str = "auto",
                   optimizer_state_step: int | None = None) -> AnnealSource:
    """Find the model weights and the optimizer state of a pre-annealing checkpoint.

    Accepted: an HF Trainer `checkpoint-N` dir; a training output dir holding `checkpoint-*` (the latest with
    an optimizer.pt is used); a model dir holding a DeepSpeed universal checkpoint (`latest_universal` /
    `global_step*_universal`, as YuLan-Mini-Before-Annealing); a `global_step*_universal` folder itself (weights from
    its parent); a hub id (downloaded with huggingface_hub, the universal checkpoint included).

    Among several `global_step*_universal` folders the one read is `optimizer_state_step`'s, else the documented one
    of a known hub repository (`DOCUMENTED_OPTIMIZER_STEPS`), else the one the weights' step agrees with, else none:
    `optimizer_state.choose_universal_checkpoint` refuses rather than guess."""
    if optimizer_state_step is None and name_or_path in DOCUMENTED_OPTIMIZER_STEPS:
        optimizer_state_step = DOCUMENTED_OPTIMIZER_STEPS[name_or_path]
        documented = f"the documented step of {name_or_path}"
    else:
        documented = None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name_or_path}: no such directory")
        path = _download(name_or_path, optimizer_state_step)
    if (path / "zero").is_dir() and not (path / "config.json").is_file():  # the universal folder itself
        model_dir = path.parent
    elif not (path / "config.json").is_file() and (latest := _latest_trainer_checkpoint(path)) is not None:
        model_dir = latest
    else:
        model_dir = path
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json with the model weights (looked in {model_dir}); pass a "
                                "model dir, an HF checkpoint-N dir or a training output dir")

    choice = None
    if optimizer_state == "none":
        optimizer_dir = None
    elif optimizer_state != "auto":
        optimizer_dir = Path(optimizer_state).expanduser()
        if not optimizer_dir.exists():
            raise FileNotFoundError(f"optimizer_state={optimizer_state!r}: no such file or directory")
        if not (optimizer_dir / "optimizer.pt").is_file() and has_universal_checkpoint(optimizer_dir):
            choice = choose_universal_checkpoint(optimizer_dir, step=optimizer_state_step, hint_dirs=[model_dir])
    elif (model_dir / "optimizer.pt").is_file():
        optimizer_dir = model_dir
    elif (choice := choose_universal_checkpoint(path if (path / "zero").is_dir() else model_dir,
                                                step=optimizer_state_step, hint_dirs=[model_dir])) is not None:
        optimizer_dir = choice.folder
    else:
        raise FileNotFoundError(
            f"{model_dir}: no optimizer state (no optimizer.pt, no DeepSpeed universal checkpoint). Annealing is "
            "meant to continue the checkpoint's AdamW moments; a released model (e.g. a Llama export) has none. "
            "Point model_name_or_path at a pre-annealing checkpoint (YuLan-Mini-Before-Annealing, or a checkpoint-N "
            "of `yulan-tune pretrain`), pass optimizer_state=PATH, or optimizer_state='none' to start AdamW afresh."
        )
    if choice is not None:
        optimizer_dir = choice.folder
        reason = documented if documented and choice.reason.startswith("optimizer_state_step") else choice.reason
        return AnnealSource(model_dir, optimizer_dir, choice.step, "; ".join([reason, *choice.notes]))
    return AnnealSource(model_dir, optimizer_dir, optimizer_state_step)


def download_patterns(step: int | None) -> list[str] | None:
    """The files an anneal needs from a hub repository: weights, config and tokenizer at the top level, and only the
    one universal step folder (the others are tens of GB each for YuLan-Mini); None (everything) without a step."""
    if step is None:
        return None
    return ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "latest_universal",
            f"global_step{step}_universal/*"]


def _download(repo_id: str, step: int | None = None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = download_patterns(step)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, missing repo, gated: one actionable line
        include = " ".join(f"--include '{p}'" for p in patterns) if patterns else ""
        raise FileNotFoundError(
            f"could not load {repo_id!r}: no such local directory, and downloading it from the hub failed "
            f"({type(error).__name__}). Download it where the hub is reachable "
            f"(`huggingface-cli download {repo_id} {include + ' ' if include else ''}--local-dir DIR`, which "
            "includes its global_step*_universal optimizer states) and pass DIR."
        ) from error
