"""Curriculum phases from data-mix files, planned in rows and optimizer steps.

YuLan-Mini was pretrained in curriculum phases of ~40B tokens, each with its own mix of subsets
(docs/yulan_reference.md 3.5, 5). A phase here is a name, a token budget per dataset and a row length. Two file formats:

1. The reference's data_mix JSON (e.g. `26_20241211_015209.json`), read as it is. It states three things per subset:
   "Manual Selected Tokens(B)" = [target, is_sft], the budget asked for by hand; "Number of Selected Tokens(B)", what
   was actually selected; "Token ID Files Information", the ~3B-token groups of files it was selected into. The
   budget of a subset is "Number of Selected Tokens(B)": it is what the phase trained on, it equals the sum of the
   subset's file groups and its values sum to "Total Tokens(B)", while the manual targets do not (the realized
   selection overshoots or undershoots them by up to ~10%, e.g. 0.0080 vs 0.0004 for a small set in phase 26).

2. A YAML curriculum, in a long form

       seq_len: 4096                 # row length of every phase unless a phase says otherwise
       data_root: ../data            # dataset NAME resolves to <data_root>/NAME (relative to this file)
       datasets: {code: /data/code}  # explicit locations win over data_root
       phases:
         - name: "01"
           tokens: {fineweb-edu: 14.58B, code: 1200M}   # absolute budgets: integers or "1.5M" / "40B" strings
         - name: "02"
           total_tokens: 40B
           weights: {fineweb-edu: 0.6, code: 0.4}        # relative weights of a total budget

   or a short form `phases: {NAME: {DATASET: tokens or weight}}`: a value is a token budget when it is an integer or
   a string with a K/M/B/T suffix, a weight when it is a float; weights need a top-level `phase_tokens`.

A phase is planned in rows and optimizer steps (`plan_phases`): each dataset's budget becomes round(tokens / seq_len)
rows, and the phase runs floor(rows / rows_per_step) steps; the rows past the last whole step are counted.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


class CurriculumError(ValueError):
    """A curriculum file that cannot be used; the message names the file, phase and dataset."""


def parse_token_count(value: Any, where: str = "") -> int:
    """An integer, a whole float (YAML reads `1.5e6` as one), or a string like "40B", "1.5M", "300k", "4096"."""
    if isinstance(value, bool):
        raise CurriculumError(f"{where}: expected a token count, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", value)
        if match:
            return round(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])
    raise CurriculumError(f"{where}: expected a token count (an integer or a string such as '40B', '1.5M'), "
                          f"got {value!r}")


@dataclass(frozen=True)
class Phase:
    """One curriculum stage: a token budget per dataset, at a row length."""

    name: str
    tokens: dict[str, int]
    seq_len: int | None = None  # None: the curriculum's default
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclass(frozen=True)
class Curriculum:
    phases: list[Phase]
    seq_len: int | None = None
    dataset_dirs: dict[str, str] = field(default_factory=dict)  # dataset name -> directory
    data_root: str | None = None
    source: str | None = None

    def phase_seq_len(self, phase: Phase, default: int | None = None) -> int:
        seq_len = phase.seq_len or self.seq_len or default
        if seq_len is None:
            raise CurriculumError(f"{self.source}: phase {phase.name!r}: no seq_len (set it on the phase, at the top "
                                  f"of the curriculum, or in the config)")
        return seq_len

    def dataset_path(self, name: str, data_root: str | os.PathLike | None = None) -> Path:
        """Where dataset `name` lives: an explicit `datasets` entry, else `<data_root>/<name>` (the argument wins
        over the file's `data_root`)."""
        if name in self.dataset_dirs:
            return Path(self.dataset_dirs[name])
        root = data_root if data_root is not None else self.data_root
        if root is None:
            raise CurriculumError(f"{self.source}: dataset {name!r} has no location: add it under `datasets:` or set "
                                  f"data_root")
        return Path(root) / name


# ------------------------------------------------------------------------------------------------ reading files


def _billions(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CurriculumError(f"{where}: expected a non-negative number of billions of tokens, got {value!r}")
    return float(value)


def _manual_target(value: Any, where: str) -> tuple[float, bool]:
    """A "Manual Selected Tokens(B)" entry: a plain number (the reference's fetch_data.py writes the target alone) or
    [number] / [number, is_sft flag] (later phases: flag "1" / 1 / true marks SFT-style data, "" / "0" / 0 not)."""
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 2:
        flag = value[1] if len(value) == 2 else ""
        if flag not in ("", "0", "1", 0, 1, True, False, None):
            raise CurriculumError(f"{where}: expected the is_sft flag '1' or '' after the target, got {flag!r}")
        return _billions(value[0], where), flag in ("1", 1, True)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _billions(value, where), False
    raise CurriculumError(f"{where}: expected a number or [number, is_sft flag], got {value!r}")


def read_data_mix(path: str | os.PathLike) -> Phase:
    """One phase from the reference's data_mix JSON; budgets = "Number of Selected Tokens(B)" (module docstring).

    Every layout the reference's fetch_data.py wrote is read: "Manual Selected Tokens(B)" values as plain numbers
    (earlier phases) or [number, is_sft flag] (later ones), "Total Huggingface Datasets Directory" as a bare name or a
    full path (its last part is the mix id). A field of another shape is a CurriculumError that names it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CurriculumError(f"{path}: not a JSON data_mix file ({error})") from None
    if not isinstance(data, Mapping):
        raise CurriculumError(f"{path}: expected a JSON object (a YuLan data_mix file), got {type(data).__name__}")
    required = ("Total Tokens(B)", "Number of Selected Tokens(B)")
    missing = [key for key in required if key not in data]
    if missing:
        raise CurriculumError(f"{path}: not a YuLan data_mix file, missing {missing}")
    selected = data["Number of Selected Tokens(B)"]
    if not isinstance(selected, Mapping):
        raise CurriculumError(f"{path}: field 'Number of Selected Tokens(B)': expected an object subset -> billions, "
                              f"got {type(selected).__name__}")
    billions = {str(subset): _billions(value, f"{path}: field 'Number of Selected Tokens(B)'.{subset!r}")
                for subset, value in selected.items()}
    tokens = {subset: round(value * 1e9) for subset, value in billions.items() if round(value * 1e9) > 0}
    manual = data.get("Manual Selected Tokens(B)") or {}
    groups = data.get("Token ID Files Information") or {}
    for field_name, value in (("Manual Selected Tokens(B)", manual), ("Token ID Files Information", groups)):
        if not isinstance(value, Mapping):
            raise CurriculumError(f"{path}: field {field_name!r}: expected an object keyed by subset, got "
                                  f"{type(value).__name__}")
    targets = {str(subset): _manual_target(value, f"{path}: field 'Manual Selected Tokens(B)'.{subset!r}")
               for subset, value in manual.items()}
    mix_id = Path(str(data.get("Total Huggingface Datasets Directory") or path.stem)).name
    metadata = {
        "mix_id": mix_id,
        "total_tokens_b": _billions(data["Total Tokens(B)"], f"{path}: field 'Total Tokens(B)'"),
        "manual_tokens_b": {subset: target for subset, (target, _) in targets.items()},
        "is_sft": sorted(subset for subset, (_, is_sft) in targets.items() if is_sft),
        "empty_subsets": sorted(subset for subset in billions if subset not in tokens),
        "file_groups": {str(subset): [group.get("huggingface datasets directory") for group in value
                                      if isinstance(group, Mapping)] if isinstance(value, list) else []
                        for subset, value in groups.items()},
    }
    if not tokens:
        raise CurriculumError(f"{path}: field 'Number of Selected Tokens(B)': no subset has any tokens")
    return Phase(name=mix_id, tokens=tokens, metadata=metadata)


def _phase_from_mapping(entry: Mapping[str, Any], where: str, default_total: Any) -> Phase:
    name = str(entry.get("name", "")).strip()
    if not name:
        raise CurriculumError(f"{where}: a phase needs a `name`")
    where = f"{where}: phase {name!r}"
    if ("tokens" in entry) == ("weights" in entry):
        raise CurriculumError(f"{where}: give exactly one of `tokens` (absolute budgets) and `weights`")
    seq_len = entry.get("seq_len")
    metadata = {key: value for key, value in entry.items() if key not in ("name", "tokens", "weights", "seq_len",
                                                                           "total_tokens")}
    if "tokens" in entry:
        mix = entry["tokens"]
        if not isinstance(mix, Mapping) or not mix:
            raise CurriculumError(f"{where}: `tokens` must map dataset names to token counts")
        tokens = {str(k): parse_token_count(v, f"{where}: dataset {k!r}") for k, v in mix.items()}
    else:
        total = entry.get("total_tokens", default_total)
        if total is None:
            raise CurriculumError(f"{where}: `weights` need a `total_tokens` budget for the phase")
        tokens = _tokens_from_weights(entry["weights"], parse_token_count(total, f"{where}: total_tokens"), where)
    for dataset, count in tokens.items():
        if count <= 0:
            raise CurriculumError(f"{where}: dataset {dataset!r}: the budget must be > 0 tokens, got {count}")
    return Phase(name=name, tokens=tokens, seq_len=int(seq_len) if seq_len else None, metadata=metadata)


def _tokens_from_weights(weights: Any, total: int, where: str) -> dict[str, int]:
    if not isinstance(weights, Mapping) or not weights:
        raise CurriculumError(f"{where}: `weights` must map dataset names to numbers")
    for dataset, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise CurriculumError(f"{where}: dataset {dataset!r}: a weight must be a positive number, got {weight!r}")
    norm = sum(weights.values())
    return {str(dataset): round(total * weight / norm) for dataset, weight in weights.items()}


def _short_form_phase(name: str, mix: Any, where: str, phase_tokens: Any) -> Phase:
    where = f"{where}: phase {name!r}"
    if not isinstance(mix, Mapping) or not mix:
        raise CurriculumError(f"{where}: expected a mapping of dataset -> tokens or weight")
    kinds = {dataset: "weight" if isinstance(value, float) else "tokens" for dataset, value in mix.items()}
    if len(set(kinds.values())) > 1:
        weights = sorted(d for d, k in kinds.items() if k == "weight")
        raise CurriculumError(f"{where}: mixes token counts and weights (floats: {weights}); write token counts as "
                              f"integers or '1.5M'-style strings, weights as floats, one kind per phase")
    if "weight" in kinds.values():
        if phase_tokens is None:
            raise CurriculumError(f"{where}: weights (floats) need a top-level `phase_tokens` budget")
        tokens = _tokens_from_weights(mix, parse_token_count(phase_tokens, f"{where}: phase_tokens"), where)
    else:
        tokens = {str(d): parse_token_count(v, f"{where}: dataset {d!r}") for d, v in mix.items()}
    return Phase(name=name, tokens=tokens)


def read_curriculum_yaml(path: str | os.PathLike) -> Curriculum:
    import yaml

    path = Path(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the 27-phase file in ~0.1 s
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    where = str(path)
    if not isinstance(data, Mapping) or "phases" not in data:
        raise CurriculumError(f"{where}: expected a mapping with a `phases` key")
    phases_data = data["phases"]
    if isinstance(phases_data, Mapping):  # short form
        phases = [_short_form_phase(str(name), mix, where, data.get("phase_tokens"))
                  for name, mix in phases_data.items()]
    elif isinstance(phases_data, list):
        phases = []
        for index, entry in enumerate(phases_data):
            if not isinstance(entry, Mapping):
                raise CurriculumError(f"{where}: phases[{index}]: expected a mapping, got {type(entry).__name__}")
            phases.append(_phase_from_mapping(entry, where, data.get("phase_tokens")))
    else:
        raise CurriculumError(f"{where}: `phases` must be a list of phases or a mapping name -> mix")
    names = [phase.name for phase in phases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CurriculumError(f"{where}: duplicate phase names {duplicates}")
    base = path.parent

    def resolve(location: str) -> str:
        return str((base / Path(location).expanduser()).resolve()) if not Path(location).is_absolute() else location

    dataset_dirs = {str(name): resolve(str(location)) for name, location in (data.get("datasets") or {}).items()}
    data_root = resolve(str(data["data_root"])) if data.get("data_root") else None
    return Curriculum(phases=phases, seq_len=data.get("seq_len"), dataset_dirs=dataset_dirs, data_root=data_root,
                      source=where)


def load_curriculum(source: str | os.PathLike | Sequence[str | os.PathLike]) -> Curriculum:
    """A YAML curriculum, one data_mix JSON (one phase), or several / a directory of them (phases in name order)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise CurriculumError(f"{path}: no data_mix *.json files in this directory")
            return Curriculum(phases=[read_data_mix(f) for f in files], source=str(path))
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such curriculum file")
        if path.suffix.lower() in (".yaml", ".yml"):
            return read_curriculum_yaml(path)
        if path.suffix.lower() == ".json":
            return Curriculum(phases=[read_data_mix(path)], source=str(path))
        raise CurriculumError(f"{path}: expected a .yaml curriculum or data_mix .json file(s)")
    return Curriculum(phases=[read_data_mix(p) for p in source], source=", ".join(map(str, source)))


# ------------------------------------------------------------------------------------------------ planning phases


@dataclass
class PhasePlan:
    """What one phase trains on, in rows and optimizer steps."""

    index: int
    name: str
    seq_len: int
    rows: dict[str, int]  # rows per dataset, before dropping the last incomplete step
    offsets: dict[str, int]  # start of each dataset's stream cursor
    steps: int
    rows_per_step: int
    dropped_rows: int  # rows past the last whole step: not trained on (reported)
    dataset_paths: dict[str, str]

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len


def plan_phases(
    curriculum: Curriculum,
    rows_per_step: int,
    *,
    default_seq_len: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> list[PhasePlan]:
    """Rows and steps of every phase: each dataset's budget becomes round(tokens / seq_len) rows; the phase runs
    floor(rows / rows_per_step) optimizer steps. Stream cursors carry over between phases (MixtureDataset)."""
    plans: list[PhasePlan] = []
    cursor: dict[str, int] = {}
    for index, phase in enumerate(curriculum.phases):
        seq_len = curriculum.phase_seq_len(phase, default_seq_len)
        rows = {name: max(round(tokens / seq_len), 1) for name, tokens in phase.tokens.items()}
        total = sum(rows.values())
        steps = total // rows_per_step
        if steps == 0:
            raise CurriculumError(f"{curriculum.source}: phase {phase.name!r} has {total} rows of {seq_len} tokens, "
                                  f"less than one optimizer step of {rows_per_step} rows")
        plans.append(PhasePlan(
            index=index, name=phase.name, seq_len=seq_len, rows=rows,
            offsets={name: cursor.get(name, 0) for name in rows}, steps=steps, rows_per_step=rows_per_step,
            dropped_rows=total - steps * rows_per_step,
            dataset_paths={name: str(curriculum.dataset_path(name, data_root)) for name in rows},
        ))
        for name, count in rows.items():
            cursor[name] = cursor.get(name, 0) + count
    return plans


def token_budget_to_steps(plans: Sequence[PhasePlan], tokens: int, *, from_end: bool = False) -> int:
    """Optimizer steps that consume `tokens`, counted from the first phase (or back from the last one), each phase
    at its own tokens per step; rounded up so a window never ends before its budget."""
    steps = 0
    remaining = tokens
    for plan in (reversed(plans) if from_end else plans):
        if remaining <= 0:
            break
        phase_tokens = plan.steps * plan.tokens_per_step
        if remaining >= phase_tokens:
            steps += plan.steps
            remaining -= phase_tokens
        else:
            steps += math.ceil(remaining / plan.tokens_per_step)
            remaining = 0
    if remaining > 0:
        raise CurriculumError(f"{tokens} tokens exceed the {sum(p.steps * p.tokens_per_step for p in plans)} tokens "
                              f"of the planned phases")
    return steps
