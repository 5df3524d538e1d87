"""Read AdamW moments and the step from a pre-annealing checkpoint and put them into a torch AdamW.

Annealing resumes "at the point where learning is most effective" (docs/yulan_reference.md section 4), which only works
if the optimizer keeps its moments: a fresh AdamW has exp_avg_sq = 0 and takes full-size sign steps at the
checkpoint's LR. Two checkpoint formats carry the moments:

(a) HF Trainer checkpoints (ours included): `optimizer.pt` is `torch.optim.Optimizer.state_dict()` (state keyed by
    the position of each parameter in the param groups, `param_names` per group when the optimizer was built from
    named parameters), `scheduler.pt` the LR scheduler's state dict, `trainer_state.json` the global step.
(b) DeepSpeed universal checkpoints, the format `YuLan-Mini-Before-Annealing` ships its AdamW states in
    (`global_step243198_universal`, docs/yulan_reference.md 1.6), as written by DeepSpeed's `ds_to_universal.py`
    (read at deepspeed 0.19.8, `deepspeed/checkpoint/ds_to_universal.py` + `universal_checkpoint.py`):

        <root>/latest_universal                     text: the folder converted last (not trusted alone when there
                                                    are several: `choose_universal_checkpoint`)
        <root>/global_step<N>_universal/
            mp_rank_00_model_states.pt              engine state: module, param_shapes, global_steps, lr_scheduler,
                                                    ds_config, ds_version (copied from the ZeRO checkpoint)
            zero/optimizer_state.pt                 the non-sharded optimizer state: param_groups (lr, betas, eps,
                                                    weight_decay, ...), zero_stage, loss_scaler (a DeepSpeed object)
            zero/<param name>/fp32.pt               {"param": fp32 master weight, "cat_dim": 0, ...}
            zero/<param name>/exp_avg.pt            {"param": first moment, ...}
            zero/<param name>/exp_avg_sq.pt         {"param": second moment, ...}
            zero/<param name>/step.pt               the optimizer step (python int from FusedAdam, 0-dim tensor
                                                    from torch Adam; ZeRO-3 conversions write none)
            zero/<alias>/fp32.pt                    only this file for a module state-dict entry without optimizer
                                                    state: a tied alias (engine `shared_params`, e.g. lm_head.weight;
                                                    the bf16 module weight cast to fp32), a buffer, a frozen parameter

    ZeRO-3 conversions (`merge_zero3_slices`) save the bare flat tensor instead of the {"param": ...} dict; both are
    read, and 0-dim parameters may be stored as () or (1,) (DeepSpeed's merge cannot concatenate 0-dim slices, so
    converters that handle them flatten first). tests/fixtures/deepspeed/ holds such folders written by DeepSpeed
    0.19.8 itself, with the live engine state beside them.
    DeepSpeed itself loads all of these with `weights_only=False`. We never do: every file goes through
    `torch.load(weights_only=True)`. The only non-tensor objects DeepSpeed pickles into them are its own config
    holders (the loss scaler in optimizer_state.pt, `SubparamShape` for fused tensor-parallel parameters); those
    globals are replaced by an inert placeholder class of ours that stores the pickled fields and runs no code, so
    no DeepSpeed code (DeepSpeed need not be installed) and no code named by the file executes. A file that names
    any other non-allowlisted global is refused with `UnsafeCheckpointError`.

Parameter names are mapped between the checkpoint and the model (the checkpoint's names may differ, e.g. YuLan's
reference implementation vs ours); every model parameter that gets no saved state and every saved state that finds
no model parameter is listed in the `OptimizerStateReport`, and by default (`strict=True`) either one is an error:
a moment is never silently re-initialized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AmbiguousCheckpointError",
    "CheckpointOptimizerState",
    "OptimizerStateReport",
    "SavedParamState",
    "UnsafeCheckpointError",
    "choose_universal_checkpoint",
    "find_universal_checkpoint",
    "has_universal_checkpoint",
    "hf_default_param_groups",
    "load_optimizer_state",
    "read_optimizer_checkpoint",
    "read_trainer_checkpoint",
    "read_universal_checkpoint",
    "recorded_steps",
    "safe_torch_load",
    "universal_step_folders",
    "UniversalCheckpointChoice",
]

# Global names DeepSpeed may pickle into checkpoint files: only data holders under its own namespace are replaced
# by the inert placeholder; anything else a file asks for is refused.
_STUBBABLE_PREFIX = "deepspeed."
_UNIVERSAL_STEP_DIR = re.compile(r"^global_step(\d+)_universal$")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs arbitrary objects to be unpickled; we refuse rather than run code from a file."""


class _InertPickledObject:
    """Stands in for a DeepSpeed object pickled into a checkpoint. Holds the pickled arguments and state; has no
    behaviour, so unpickling it executes nothing. `pickled_name` says which global it replaced."""

    pickled_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


def _inert_class(global_name: str) -> type:
    return type("InertPickledObject", (_InertPickledObject,), {"pickled_name": global_name})


def safe_torch_load(path: str | Path, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` that also accepts DeepSpeed's pickled config holders as inert
    placeholders (see the module docstring) and refuses every other non-allowlisted global with a clear error."""
    path = Path(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # not a torch zip archive (e.g. a legacy-format file)
        raise UnsafeCheckpointError(
            f"{path}: cannot inspect this file's pickle without loading it ({error}); only torch zip-format files "
            "are read (torch.save with the default _use_new_zipfile_serialization=True)."
        ) from error
    refused = [name for name in needed if not name.startswith(_STUBBABLE_PREFIX)]
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: loading this file would unpickle {refused}, which are not tensors, plain containers or "
            "DeepSpeed config holders. yulan_tune only loads checkpoints with weights_only=True and does not run "
            "code named by a file. If you trust the file, convert it yourself to plain tensors/dicts."
        )
    stubs = [(_inert_class(name), name) for name in needed]
    with torch.serialization.safe_globals(stubs):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@dataclass
class SavedParamState:
    """One parameter's saved AdamW state."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    master_weight: torch.Tensor | None = None  # fp32 master copy (DeepSpeed universal `fp32.pt`)


@dataclass
class CheckpointOptimizerState:
    """Everything read from one checkpoint's optimizer files.

    `params` is keyed by the checkpoint's own parameter names when it records them (`named=True`); an HF checkpoint
    whose optimizer was built from unnamed groups has keys "<group>:<index>" that `load_optimizer_state` resolves by
    position against the target optimizer."""

    source: Path
    format: str  # "hf_trainer" | "deepspeed_universal"
    global_step: int
    params: dict[str, SavedParamState]
    param_groups: list[dict[str, Any]]  # saved hyperparameters per group (lr, initial_lr, betas, eps, weight_decay)
    named: bool
    notes: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # tied alias folder -> the parameter holding its state
    choice: str | None = None  # why this folder was read (several step folders: see choose_universal_checkpoint)

    @property
    def lr(self) -> float:
        """The LR at the saved step of the full-rate group: where an annealing decay starts. Groups written by
        `training/mup.py` record their `lr_scale` (lr = full rate x lr_scale), so the full rate is lr / lr_scale
        (equal for all groups); otherwise it is the largest group LR (YuLan's muP groups divide the full rate by
        m_width = 7.5, docs/yulan_reference.md 3.2)."""
        if all("lr_scale" in group for group in self.param_groups):
            rates = [float(group["lr"]) / float(group["lr_scale"]) for group in self.param_groups]
            if max(rates) - min(rates) > 1e-9 * max(rates):
                raise ValueError(f"{self.source}: param groups record lr / lr_scale = {rates}, which should be one "
                                 "full rate; the checkpoint's groups are inconsistent")
            return rates[0]
        return max(float(group["lr"]) for group in self.param_groups)

    @property
    def group_lrs(self) -> list[float]:
        return [float(group["lr"]) for group in self.param_groups]


# --------------------------------------------------------------------------------------------------------------------
# (a) HF Trainer checkpoints


def read_trainer_checkpoint(path: str | Path) -> CheckpointOptimizerState:
    """Read `optimizer.pt` (+ `trainer_state.json` for the step) of an HF Trainer `checkpoint-N` directory."""
    path = Path(path)
    optimizer_file = path / "optimizer.pt"
    if not optimizer_file.is_file():
        raise FileNotFoundError(
            f"{path}: no optimizer.pt. An HF Trainer checkpoint-N directory has one when it was saved with "
            "save_only_model=False; a DeepSpeed run has a global_step*/ folder instead (convert it with DeepSpeed's "
            "ds_to_universal.py to a global_step*_universal folder, which yulan_tune reads)."
        )
    saved = safe_torch_load(optimizer_file)
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        raise ValueError(f"{optimizer_file}: expected torch.optim.Optimizer.state_dict() (keys 'state', "
                         f"'param_groups'), got {type(saved).__name__} with keys {list(saved)[:8]}")
    notes: list[str] = []
    global_step = None
    trainer_state_file = path / "trainer_state.json"
    if trainer_state_file.is_file():
        global_step = int(json.loads(trainer_state_file.read_text())["global_step"])

    named = all("param_names" in group for group in saved["param_groups"])
    params: dict[str, SavedParamState] = {}
    groups: list[dict[str, Any]] = []
    for group_index, group in enumerate(saved["param_groups"]):
        groups.append({k: v for k, v in group.items() if k not in ("params",)})
        names = group.get("param_names") or [f"{group_index}:{i}" for i in range(len(group["params"]))]
        for name, index in zip(names, group["params"]):
            state = saved["state"].get(index)
            if not state:  # a parameter that never got a gradient has no state: reported as missing on load
                continue
            missing = [k for k in (*_MOMENT_KEYS, "step") if k not in state]
            if missing:
                raise ValueError(f"{optimizer_file}: state of parameter {name!r} has no {missing}; expected an "
                                 f"Adam/AdamW state (keys step, exp_avg, exp_avg_sq), got {sorted(state)}")
            params[name] = SavedParamState(state["exp_avg"], state["exp_avg_sq"], _as_int(state["step"]))
    steps = {p.step for p in params.values()}
    if global_step is None:
        if len(steps) != 1:
            raise ValueError(f"{path}: no trainer_state.json and the saved per-parameter steps disagree ({steps})")
        global_step = steps.pop()
        notes.append("global step taken from the optimizer's per-parameter step (no trainer_state.json)")
    elif steps and steps != {global_step}:
        # legitimate with gradient accumulation? No: AdamW steps once per optimizer step. Skipped steps (inf grads
        # with fp16) make them lag; the per-parameter step is what bias correction needs, so it is kept.
        notes.append(f"optimizer per-parameter steps {sorted(steps)} differ from trainer global_step {global_step}; "
                     "the per-parameter steps are loaded (they drive AdamW's bias correction)")
    return CheckpointOptimizerState(path, "hf_trainer", global_step, params, groups, named, notes)


# --------------------------------------------------------------------------------------------------------------------
# (b) DeepSpeed universal checkpoints


@dataclass
class UniversalCheckpointChoice:
    """Which `global_step<N>_universal` folder is read, and why (recorded in the anneal plan)."""

    folder: Path
    step: int | None  # from the folder name (global_step<N>_universal); None for a folder named otherwise
    reason: str
    candidates: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class AmbiguousCheckpointError(ValueError):
    """Several step folders and nothing that says which one the weights belong to: we refuse rather than guess."""


def _folder_step(folder: Path) -> int | None:
    match = _UNIVERSAL_STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def universal_step_folders(path: str | Path) -> list[Path]:
    """The `global_step<N>_universal` folders (with a zero/ inside) directly in `path`, by step."""
    path = Path(path)
    found = [child for child in path.glob("global_step*_universal")
             if _UNIVERSAL_STEP_DIR.match(child.name) and (child / "zero").is_dir()]
    return sorted(found, key=_folder_step)


def has_universal_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a universal checkpoint folder or holds one (or a latest_universal pointer)."""
    path = Path(path)
    return (path / "zero").is_dir() or (path / "latest_universal").is_file() or bool(universal_step_folders(path))


def recorded_steps(*dirs: str | Path | None) -> dict[str, int]:
    """The training step the weights in these dirs say they are from: `trainer_state.json` global_step (HF Trainer
    checkpoints, which is how YuLan-Mini's run saved) and, failing that, config.json's
    `num_steps_trained_before_this_epoch` (yulanmini bookkeeping; our anneals write their start step there).
    Keyed by the file it came from."""
    steps: dict[str, int] = {}
    for directory in dict.fromkeys(Path(d) for d in dirs if d is not None):
        trainer_state = directory / "trainer_state.json"
        if trainer_state.is_file():
            try:
                steps[str(trainer_state)] = int(json.loads(trainer_state.read_text())["global_step"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{trainer_state}: expected a JSON object with an integer global_step ({error})")
        config = directory / "config.json"
        if config.is_file() and not steps:
            value = json.loads(config.read_text()).get("num_steps_trained_before_this_epoch")
            if isinstance(value, int) and value > 0:
                steps[f"{config} num_steps_trained_before_this_epoch"] = value
    return steps


def choose_universal_checkpoint(
    path: str | Path, *, step: int | None = None, hint_dirs: Sequence[str | Path] = ()
) -> UniversalCheckpointChoice | None:
    """The universal checkpoint folder to read from `path`, chosen so that it cannot silently be the wrong one.

    `path` is a `global_step<N>_universal` folder (read as it is) or a directory holding such folders (a model repo
    such as YuLan-Mini-Before-Annealing, whose history has held both global_step262772_universal, named by its
    `latest_universal`, and global_step243198_universal, the step its README anneals from). In order:
      1. `step` (the user's `optimizer_state_step`): global_step<step>_universal, which must exist;
      2. a single step folder: that one (a `latest_universal` naming a missing folder is reported, not followed);
      3. several folders: the one whose step the weights record (`recorded_steps` of `path` and `hint_dirs`);
      4. otherwise AmbiguousCheckpointError, one line listing the folders. `latest_universal` alone never decides
         between several folders: it names the folder converted last, not the folder the weights belong to.
    None when `path` holds no universal checkpoint at all."""
    path = Path(path)
    if (path / "zero").is_dir():
        folder_step = _folder_step(path)
        if step is not None and folder_step is not None and folder_step != step:
            raise ValueError(f"optimizer_state_step={step}, but the universal checkpoint given is {path} (step "
                             f"{folder_step}); give the folder of step {step} or its parent directory")
        return UniversalCheckpointChoice(path, folder_step, "the universal checkpoint folder given", [path])
    candidates = universal_step_folders(path)
    names = ", ".join(c.name for c in candidates) or "none"
    notes: list[str] = []
    pointer = None
    latest = path / "latest_universal"
    if latest.is_file():
        pointer = latest.read_text().strip()
        if not (path / pointer / "zero").is_dir():
            notes.append(f"{latest} names {pointer!r}, which is not here (a removed or not downloaded folder); "
                         "ignored")
    if step is not None:
        wanted = path / f"global_step{step}_universal"
        if not (wanted / "zero").is_dir():
            raise FileNotFoundError(f"{path}: optimizer_state_step={step}, but there is no "
                                    f"global_step{step}_universal/zero; step folders here: {names}")
        reason = f"optimizer_state_step={step}"
        if pointer is not None and pointer != wanted.name:
            notes.append(f"latest_universal names {pointer!r}; {wanted.name} is read as optimizer_state_step says")
        return UniversalCheckpointChoice(wanted, step, reason, candidates, notes)
    if not candidates:
        if pointer is not None:
            raise FileNotFoundError(f"{latest} names {pointer!r}, but {path / pointer}/zero does not exist and no "
                                    "other global_step*_universal folder is here")
        return None
    if len(candidates) == 1:
        reason = "the only step folder" + (" (named by latest_universal)" if pointer == candidates[0].name else "")
        return UniversalCheckpointChoice(candidates[0], _folder_step(candidates[0]), reason, candidates, notes)
    recorded = recorded_steps(path, *hint_dirs)
    by_step = {_folder_step(c): c for c in candidates}
    agreeing = {source: value for source, value in recorded.items() if value in by_step}
    chosen_steps = set(agreeing.values())
    if len(chosen_steps) == 1:
        chosen = chosen_steps.pop()
        sources = ", ".join(agreeing)
        if pointer is not None and pointer != by_step[chosen].name:
            notes.append(f"latest_universal names {pointer!r}, but the weights record step {chosen} ({sources})")
        return UniversalCheckpointChoice(by_step[chosen], chosen, f"the step the weights record ({sources})",
                                         candidates, notes)
    said = "; ".join(f"{source} says {value}" for source, value in recorded.items()) or "no trainer_state.json"
    raise AmbiguousCheckpointError(
        f"{path}: {len(candidates)} DeepSpeed universal checkpoints ({names})"
        + (f", latest_universal names {pointer}" if pointer else "")
        + f", and the weights do not say which one is theirs ({said}); set optimizer_state_step to one of "
        + ", ".join(str(s) for s in by_step)
        + " (yulan-team/YuLan-Mini-Before-Annealing: 243198) or pass the folder as optimizer_state"
    )


def find_universal_checkpoint(path: str | Path, *, step: int | None = None,
                              hint_dirs: Sequence[str | Path] = ()) -> Path | None:
    """The folder `choose_universal_checkpoint` picks, or None."""
    choice = choose_universal_checkpoint(path, step=step, hint_dirs=hint_dirs)
    return choice.folder if choice is not None else None


def _unwrap_param(loaded: Any, file: Path) -> torch.Tensor:
    # ds_to_universal (ZeRO 1/2) saves {"param": tensor, "cat_dim": 0, ...}; its ZeRO-3 branch saves the bare tensor.
    tensor = loaded.get("param") if isinstance(loaded, dict) else loaded
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{file}: expected a tensor or a dict with the tensor under 'param', got {type(loaded).__name__}"
                         + (f" with keys {sorted(loaded)}" if isinstance(loaded, dict) else ""))
    return tensor


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def read_universal_checkpoint(path: str | Path, *, load_master_weights: bool = True, step: int | None = None,
                              hint_dirs: Sequence[str | Path] = ()) -> CheckpointOptimizerState:
    """Read a DeepSpeed universal checkpoint (layout in the module docstring) without DeepSpeed.

    `path` is the `global_step<N>_universal` folder or a directory containing such folders (a model repo such as
    YuLan-Mini-Before-Annealing); which folder is read follows `choose_universal_checkpoint` (`step`, `hint_dirs`).
    The step comes from `zero/<param>/step.pt` when present (ZeRO-1/2; an int from DeepSpeed's FusedAdam, a tensor
    from torch Adam), else from the engine's `global_steps` (ZeRO-3 writes no step.pt), else from the folder name."""
    choice = choose_universal_checkpoint(path, step=step, hint_dirs=hint_dirs)
    if choice is None:
        raise FileNotFoundError(f"{path}: no DeepSpeed universal checkpoint (expected zero/<param>/exp_avg.pt, a "
                                "global_step<N>_universal folder, or a latest_universal file)")
    root = choice.folder
    zero = root / "zero"
    notes: list[str] = list(choice.notes)

    engine_step = None
    engine_files = sorted(root.glob("mp_rank_*_model_states.pt")) or sorted(root.glob("*mp_rank_*_model_states.pt"))
    engine_state: dict[str, Any] = {}
    if engine_files:
        # mmap: the file also holds the whole bf16 module state dict (4.5 GB for YuLan-Mini); only metadata is read
        engine_state = safe_torch_load(engine_files[0], mmap=True)
        if engine_state.get("global_steps") is not None:
            engine_step = int(engine_state["global_steps"])
    else:
        notes.append(f"{root}: no mp_rank_*_model_states.pt (engine state); step and LR come from zero/")

    groups: list[dict[str, Any]] = []
    optimizer_state_file = zero / "optimizer_state.pt"
    if optimizer_state_file.is_file():
        common = safe_torch_load(optimizer_state_file)
        groups = [{k: v for k, v in group.items() if k != "params"} for group in common.get("param_groups", [])]
        zero_stage = common.get("zero_stage")  # DeepSpeed's ZeroStageEnum, read as an inert placeholder
        zero_stage = getattr(zero_stage, "args", (zero_stage,))[0] if zero_stage is not None else None
        if zero_stage is not None:
            version = f" (DeepSpeed {common['ds_version']})" if common.get("ds_version") else ""
            notes.append(f"written from a ZeRO stage {zero_stage} checkpoint{version}")
    scheduler_state = engine_state.get("lr_scheduler") or {}
    if not groups and scheduler_state.get("_last_lr"):
        groups = [{"lr": lr} for lr in scheduler_state["_last_lr"]]
        notes.append("group LRs taken from the engine's lr_scheduler state (zero/optimizer_state.pt has none)")
    if not groups:
        raise ValueError(f"{root}: neither zero/optimizer_state.pt param_groups nor an lr_scheduler state in "
                         f"{engine_files[:1]}: cannot tell the LR at the saved step")
    if scheduler_state.get("base_lrs") and len(scheduler_state["base_lrs"]) == len(groups):
        for group, base_lr in zip(groups, scheduler_state["base_lrs"]):
            group.setdefault("initial_lr", base_lr)

    params: dict[str, SavedParamState] = {}
    incomplete: dict[str, list[str]] = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        files = {f.stem: f for f in param_dir.glob("*.pt")}
        missing = [k for k in _MOMENT_KEYS if k not in files]
        if missing:
            # ds_to_universal writes only fp32.pt for parameters that never received a gradient
            incomplete[param_dir.name] = missing
            continue
        exp_avg = _unwrap_param(safe_torch_load(files["exp_avg"]), files["exp_avg"])
        exp_avg_sq = _unwrap_param(safe_torch_load(files["exp_avg_sq"]), files["exp_avg_sq"])
        if exp_avg.shape != exp_avg_sq.shape:
            raise ValueError(f"{param_dir}: exp_avg {tuple(exp_avg.shape)} and exp_avg_sq {tuple(exp_avg_sq.shape)} "
                             "differ in shape")
        if "step" in files:
            step = _as_int(safe_torch_load(files["step"]))
        elif engine_step is not None:
            step = engine_step
        else:
            match = _UNIVERSAL_STEP_DIR.match(root.name)
            if match is None:
                raise ValueError(f"{param_dir}: no step.pt, no engine global_steps and the folder name {root.name!r} "
                                 "is not global_step<N>_universal: cannot tell the optimizer step")
            step = int(match.group(1))
        master = None
        if load_master_weights and "fp32" in files:
            master = _unwrap_param(safe_torch_load(files["fp32"]), files["fp32"])
        params[param_dir.name] = SavedParamState(exp_avg, exp_avg_sq, step, master)
    # ds_to_universal writes an fp32.pt for every module state-dict entry that has no optimizer state: the aliases of
    # tied parameters (lm_head.weight -> model.embed_tokens.weight; the engine's shared_params, whose state sits under
    # the tied parameter, and whose fp32.pt is the bf16 module weight cast to fp32, not a master), buffers, and
    # parameters that never received a gradient
    shared = dict(engine_state.get("shared_params") or {})
    buffers = set(engine_state.get("buffer_names") or [])
    aliases = {name: shared[name] for name in incomplete if name in shared and shared[name] in params}
    buffer_folders = sorted(name for name in incomplete if name in buffers and name not in aliases)
    never_updated = sorted(set(incomplete) - set(aliases) - set(buffer_folders))
    if aliases:
        notes.append(f"{len(aliases)} tied aliases (fp32.pt only; their state is the tied parameter's): "
                     + ", ".join(f"{alias} -> {target}" for alias, target in sorted(aliases.items())))
    if buffer_folders:
        notes.append(f"{len(buffer_folders)} buffers (fp32.pt only, not optimized): {buffer_folders[:10]}")
    if never_updated:
        notes.append(f"{len(never_updated)} parameter folders have no moments (never received a gradient): "
                     f"{never_updated[:10]}")
    if not params:
        raise ValueError(f"{zero}: no <param>/exp_avg.pt + exp_avg_sq.pt found")

    steps = {p.step for p in params.values()}
    if len(steps) != 1:
        raise ValueError(f"{zero}: parameters were saved at different steps {sorted(steps)[:5]}; a universal "
                         "checkpoint holds one optimizer step")
    global_step = steps.pop()
    if engine_step is not None and engine_step != global_step:
        notes.append(f"engine global_steps {engine_step} != optimizer step {global_step} (skipped steps); the "
                     "optimizer step is loaded")
    folder_step = _folder_step(root)
    if folder_step is not None and folder_step != global_step:
        notes.append(f"the folder is named for step {folder_step}, its optimizer step is {global_step}")
    return CheckpointOptimizerState(root, "deepspeed_universal", global_step, params, groups, True, notes,
                                    aliases=aliases, choice=choice.reason)


def read_optimizer_checkpoint(path: str | Path, *, step: int | None = None,
                              hint_dirs: Sequence[str | Path] = ()) -> CheckpointOptimizerState:
    """Read whichever format `path` holds: an HF Trainer `optimizer.pt`, else a DeepSpeed universal checkpoint
    (`step` and `hint_dirs` choose among several step folders: `choose_universal_checkpoint`)."""
    path = Path(path)
    if (path / "optimizer.pt").is_file():
        saved = read_trainer_checkpoint(path)
        if step is not None and saved.global_step != step:
            raise ValueError(f"{path}: optimizer_state_step={step}, but this HF checkpoint is at step "
                             f"{saved.global_step}")
        return saved
    if has_universal_checkpoint(path):
        return read_universal_checkpoint(path, step=step, hint_dirs=hint_dirs)
    raise FileNotFoundError(
        f"{path}: no optimizer state found. Looked for optimizer.pt (HF Trainer checkpoint-N) and a DeepSpeed "
        "universal checkpoint (latest_universal, global_step<N>_universal/zero/<param>/exp_avg.pt). A plain model "
        "directory (e.g. a released Llama export) has no optimizer state: anneal it with fresh moments by passing "
        "optimizer_state=None, knowing that AdamW then restarts its moment estimates."
    )


# --------------------------------------------------------------------------------------------------------------------
# Loading into a torch AdamW


@dataclass
class OptimizerStateReport:
    """What `load_optimizer_state` did, name by name (model names)."""

    source: Path
    format: str
    step: int
    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name, where they differ
    tied: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name it is tied to
    missing: list[str] = field(default_factory=list)  # model params with no saved state (fresh moments)
    unexpected: list[str] = field(default_factory=list)  # saved states with no model param (not loaded)
    master_weights_loaded: int = 0
    matched_by_position: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"optimizer state from {self.source} ({self.format}, step {self.step}): "
                 f"{len(self.loaded)} parameters loaded"
                 + (f", {len(self.renamed)} renamed" if self.renamed else "")
                 + (", matched by position" if self.matched_by_position else "")
                 + (f", {self.master_weights_loaded} fp32 master weights copied" if self.master_weights_loaded else "")]
        if self.missing:
            lines.append(f"  {len(self.missing)} model parameters have NO saved state (fresh moments): {self.missing}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} saved states match no model parameter (not loaded): "
                         f"{self.unexpected}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


NameMap = Mapping[str, str] | Callable[[str], str | None]


def _checkpoint_to_model_names(
    saved: CheckpointOptimizerState, model_names: Sequence[str], name_map: NameMap | None
) -> dict[str, str]:
    """checkpoint name -> model name for every saved name that maps onto a model parameter."""
    model_set = set(model_names)
    result = {}
    for saved_name in saved.params:
        candidate = None
        if name_map is not None:
            candidate = name_map.get(saved_name) if isinstance(name_map, Mapping) else name_map(saved_name)
        if candidate is None:
            # wrappers that prefix names: DDP / DeepSpeed engine ("module."), torch.compile ("_orig_mod.")
            candidate = re.sub(r"^(module\.|_orig_mod\.)+", "", saved_name)
        if candidate in model_set:
            result[saved_name] = candidate
    return result


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"load_optimizer_state fills Adam/AdamW moments; got {type(inner).__name__}")
    if any(group.get("amsgrad") for group in inner.param_groups):
        raise ValueError("the checkpoint has no max_exp_avg_sq: build the optimizer with amsgrad=False")
    return inner


def _name_positional_state(
    saved: CheckpointOptimizerState, source_param_names: Sequence[Sequence[str]]
) -> CheckpointOptimizerState:
    """Replace "<group>:<index>" keys by the parameter names the caller says the saved groups held."""
    if len(source_param_names) != len(saved.param_groups):
        raise ValueError(f"{saved.source}: source_param_names has {len(source_param_names)} groups, the saved "
                         f"optimizer has {len(saved.param_groups)}")
    params = {}
    for key, entry in saved.params.items():
        group_index, index = map(int, key.split(":"))
        names = source_param_names[group_index]
        if index >= len(names):
            raise ValueError(f"{saved.source}: saved group {group_index} has a parameter at position {index}, but "
                             f"source_param_names gives that group only {len(names)} names")
        params[names[index]] = entry
    return CheckpointOptimizerState(saved.source, saved.format, saved.global_step, params, saved.param_groups, True,
                                    saved.notes + ["parameter names of the unnamed optimizer state taken from "
                                                   "source_param_names"])


def hf_default_param_groups(trainer: Any, model: torch.nn.Module) -> list[list[str]]:
    """The parameter names in the two groups `transformers.Trainer.create_optimizer` builds by default
    ([weight-decayed, not decayed], each in `named_parameters()` order, trainable only): the order an unnamed HF
    `optimizer.pt` was saved in. Uses the trainer's own `get_decay_parameter_names`."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]


def load_optimizer_state(
    checkpoint: str | Path | CheckpointOptimizerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    name_map: NameMap | None = None,
    source_param_names: Sequence[Sequence[str]] | None = None,
    strict: bool = True,
    load_master_weights: bool = False,
) -> OptimizerStateReport:
    """Fill `optimizer`'s per-parameter AdamW state (exp_avg, exp_avg_sq, step) from a checkpoint.

    checkpoint: an HF Trainer `checkpoint-N` dir, a DeepSpeed universal checkpoint (or a dir containing one), or an
        already read `CheckpointOptimizerState`.
    name_map: checkpoint parameter name -> model parameter name (dict or function returning None for "no mapping");
        names not mapped are tried as they are, minus wrapper prefixes ("module.", "_orig_mod.").
    source_param_names: for an HF optimizer.pt saved without parameter names, the names of the parameters in each
        saved group, in order (the grouping that wrote it; HF Trainer's default is [decay params, no-decay params],
        see `hf_default_param_groups`). Without it such a checkpoint is matched by position against `optimizer`'s
        own groups, which requires the same grouping (shapes are checked).
    strict: raise if any optimized model parameter gets no saved state, or any saved state matches no parameter.
        With strict=False those are loaded as far as they match and listed in the report (the unmatched model
        parameters keep fresh moments: the report says which).
    load_master_weights: also copy the checkpoint's fp32 master weights (DeepSpeed `fp32.pt`) into the parameters;
        the released safetensors are bf16 casts of them.

    Tied parameters: a model parameter shared by two modules appears once in `named_parameters()`, as does its
    state in the checkpoint. A saved state whose name is another alias of a tied tensor is matched to it.
    """
    saved = checkpoint if isinstance(checkpoint, CheckpointOptimizerState) else read_optimizer_checkpoint(checkpoint)
    torch_optimizer = _unwrap_optimizer(optimizer)
    report = OptimizerStateReport(saved.source, saved.format, saved.global_step, notes=list(saved.notes))

    name_of = {id(p): n for n, p in model.named_parameters()}  # deduplicated: tied tensors appear once
    all_aliases = {}  # every name of every parameter (tied ones included) -> canonical name
    for name, param in model.named_parameters(remove_duplicate=False):
        all_aliases[name] = name_of[id(param)]

    optimized: list[tuple[int, int, str, torch.nn.Parameter]] = []  # (group, index, model name, param)
    for group_index, group in enumerate(torch_optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            if id(param) not in name_of:
                raise ValueError(f"optimizer group {group_index} holds a parameter that is not in the model")
            optimized.append((group_index, index, name_of[id(param)], param))
    optimized_names = [name for _, _, name, _ in optimized]

    if not saved.named and source_param_names is not None:
        saved = _name_positional_state(saved, source_param_names)
    if saved.named:
        mapping = _checkpoint_to_model_names(saved, list(all_aliases), name_map)
        # resolve aliases of tied parameters to the name named_parameters() reports
        for saved_name, model_name in list(mapping.items()):
            canonical = all_aliases[model_name]
            if canonical != model_name:
                report.tied[saved_name] = canonical
                mapping[saved_name] = canonical
        targets: dict[str, str] = {}
        for saved_name, model_name in mapping.items():
            if model_name in targets:
                raise ValueError(f"checkpoint parameters {targets[model_name]!r} and {saved_name!r} both map to model "
                                 f"parameter {model_name!r}; fix name_map")
            targets[model_name] = saved_name
        report.unexpected = sorted(set(saved.params) - set(mapping))
    else:
        # Unnamed HF optimizer state: the saved groups must have the target optimizer's structure (the same
        # grouping code on the same architecture); every tensor shape is checked below.
        report.matched_by_position = True
        target_sizes = [len(group["params"]) for group in torch_optimizer.param_groups]
        if len(saved.param_groups) != len(target_sizes):
            raise ValueError(
                f"{saved.source}: the saved optimizer has {len(saved.param_groups)} param groups and no parameter "
                f"names, the target optimizer has {len(target_sizes)} groups: cannot match parameters by position. "
                "Pass source_param_names (the names in the saved groups, e.g. hf_default_param_groups(trainer, model) "
                "for HF Trainer's default optimizer), or save optimizers built from named parameters (torch then "
                "records param_names)."
            )
        targets = {}
        for group_index, index, model_name, _ in optimized:
            key = f"{group_index}:{index}"
            if key in saved.params:
                targets[model_name] = key
        report.unexpected = sorted(set(saved.params) - set(targets.values()))
        report.notes.append("the checkpoint records no parameter names: matched by position within the target "
                            "optimizer's groups (shapes checked)")

    report.missing = [name for name in optimized_names if name not in targets]
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"optimizer state of {saved.source} does not match the model:\n"
            f"  model parameters without saved state ({len(report.missing)}): {report.missing}\n"
            f"  saved states without model parameter ({len(report.unexpected)}): {report.unexpected}\n"
            "Pass name_map to map checkpoint names onto model names, or strict=False to load the matching part "
            "(the report then lists what starts with fresh moments)."
        )

    state_dict = torch_optimizer.state_dict()
    flat_index = {}  # model name -> the integer key Optimizer.state_dict() gives the parameter
    for group, saved_group in zip(torch_optimizer.param_groups, state_dict["param_groups"]):
        for param, key in zip(group["params"], saved_group["params"]):
            flat_index[name_of[id(param)]] = key

    params_by_name = {name: param for _, _, name, param in optimized}
    for model_name, saved_name in targets.items():
        param = params_by_name[model_name]
        entry = saved.params[saved_name]
        for key in _MOMENT_KEYS:
            tensor = getattr(entry, key)
            if tensor.numel() != param.numel() or (tensor.dim() > 1 and tensor.shape != param.shape):
                raise ValueError(f"{saved.source}: {key} of {saved_name!r} has shape {tuple(tensor.shape)}, model "
                                 f"parameter {model_name!r} has {tuple(param.shape)}")
            if _narrower(param.dtype, tensor.dtype):
                # torch's load_state_dict casts each state to its parameter's dtype: fp32 moments would silently
                # become bf16 (the same for the fp32 masters copied below)
                raise ValueError(f"{saved.source}: the saved {key} of {saved_name!r} is {tensor.dtype} and model "
                                 f"parameter {model_name!r} is {param.dtype}; loading would round the optimizer state "
                                 "to the parameter's dtype. Keep the parameters in float32 (bf16 compute through "
                                 "autocast, as DeepSpeed's bf16 mode keeps fp32 masters and moments)")
        state_dict["state"][flat_index[model_name]] = {
            # torch Adam(W) keeps `step` as a float32 scalar tensor (on CPU unless capturable/fused; load_state_dict
            # moves it where the optimizer wants it)
            "step": torch.tensor(float(entry.step), dtype=torch.float32),
            "exp_avg": entry.exp_avg.reshape(param.shape).clone(),
            "exp_avg_sq": entry.exp_avg_sq.reshape(param.shape).clone(),
        }
        report.loaded.append(model_name)
        if model_name != saved_name and not report.matched_by_position:
            report.renamed[model_name] = saved_name
        if load_master_weights:
            if entry.master_weight is None:
                raise ValueError(f"{saved.source}: no fp32 master weight for {saved_name!r} (load_master_weights=True)")
            if _narrower(param.dtype, entry.master_weight.dtype):
                raise ValueError(f"{saved.source}: the {entry.master_weight.dtype} master weight of {saved_name!r} "
                                 f"would be rounded into the {param.dtype} parameter {model_name!r}")
            with torch.no_grad():
                param.copy_(entry.master_weight.reshape(param.shape))
            report.master_weights_loaded += 1
    # load_state_dict is torch's own path: it casts moments to each parameter's dtype/device
    torch_optimizer.load_state_dict(state_dict)
    for model_name in report.loaded:  # what the optimizer now holds: the saved values, at the saved precision
        state, entry = torch_optimizer.state[params_by_name[model_name]], saved.params[targets[model_name]]
        for key in _MOMENT_KEYS:
            if state[key].dtype != getattr(entry, key).dtype:
                raise RuntimeError(f"{key} of {model_name!r} was loaded as {state[key].dtype}, saved as "
                                   f"{getattr(entry, key).dtype}")
    return report


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype.is_floating_point and than.is_floating_point and torch.finfo(dtype).bits < torch.finfo(than).bits
