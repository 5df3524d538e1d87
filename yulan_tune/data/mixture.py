"""Mixing packed datasets: the rows of several `PackedDataset`s in one seeded, shuffled order.

`MixtureDataset` is what a pretraining phase or an annealing run trains on: so many rows of each dataset as its
token budget (or weight) asks. Each dataset is read as an endless stream of seeded per-epoch permutations with a
cursor that carries over from phase to phase, so a dataset used by several phases gives each phase new rows until it
is exhausted, and only then repeats (the passes are reported).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from yulan_tune.data.curriculum import CurriculumError, PhasePlan
from yulan_tune.data.packed import PackedDataset
from yulan_tune.data.records import parse_mapping_text


def largest_remainder(total: int, weights: Mapping[str, float], minimum: int = 0) -> dict[str, int]:
    """Integers proportional to `weights` that sum to exactly `total` (Hamilton's method), each at least
    `minimum`: floor every exact share, then give the remaining units to the largest fractional parts."""
    norm = sum(weights.values())
    exact = {name: max(total * weight / norm, minimum) for name, weight in weights.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: max(total - sum(counts.values()), 0)]:
        counts[name] += 1
    while sum(counts.values()) > total:  # minimums raised small shares: take the excess from the largest
        counts[max(counts, key=counts.get)] -= 1
    return counts


def parse_data_mix(value: Mapping[str, float] | str | None) -> dict[str, float]:
    """A data mix {source: weight}: a mapping (YAML / Python), a JSON object string, or "a.jsonl=0.3,b.jsonl=0.7".
    Weights are normalized to sum to 1."""
    if value is None or value == "" or value == {}:
        raise ValueError("data: give at least one source, e.g. {'my_domain.jsonl': 0.3, 'replay.jsonl': 0.7}")
    value = parse_mapping_text(value, "data", "'source=weight,source=weight'")
    if not isinstance(value, Mapping):
        raise ValueError(f"data: expected a mapping source -> weight, got {type(value).__name__}")
    try:
        weights = {str(source): float(weight) for source, weight in value.items()}
    except (TypeError, ValueError):
        raise ValueError(f"data: every weight must be a number, got {dict(value)}") from None
    bad = {source: weight for source, weight in weights.items() if not weight > 0 or not math.isfinite(weight)}
    if bad:
        raise ValueError(f"data: every weight must be a positive number, got {bad}")
    total = sum(weights.values())
    return {source: weight / total for source, weight in weights.items()}


# ------------------------------------------------------------------------------------------------ mixing rows


def stream_rows(num_rows: int, start: int, count: int, *, seed: int, name: str) -> np.ndarray:
    """Positions [start, start + count) of dataset `name`'s endless row stream: epoch e is a permutation of its rows
    seeded by (seed, crc32(name), e), so the stream is the same in every process and on every resume."""
    if num_rows <= 0:
        raise ValueError(f"dataset {name!r} has no rows")
    key = zlib.crc32(name.encode())
    parts = []
    position = start
    while position < start + count:
        epoch, offset = divmod(position, num_rows)
        take = min(num_rows - offset, start + count - position)
        permutation = np.random.default_rng([seed, key, epoch]).permutation(num_rows)
        parts.append(permutation[offset:offset + take])
        position += take
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class MixtureDataset:
    """Rows of several packed datasets in one shuffled order: `rows[name]` rows of `sources[name]`, taken from
    its stream at `offsets[name]` (see `stream_rows`), shuffled together with `shuffle_seed`.
    Items are the packed datasets' items (input_ids, labels, position_ids)."""

    def __init__(
        self,
        sources: Mapping[str, PackedDataset],
        rows: Mapping[str, int],
        *,
        seed: int,
        shuffle_seed: int | Sequence[int],
        offsets: Mapping[str, int] | None = None,
    ) -> None:
        self.names = list(rows)
        missing = [name for name in self.names if name not in sources]
        if missing:
            raise KeyError(f"no packed dataset for {missing}")
        seq_lens = {name: sources[name].seq_len for name in self.names}
        if len(set(seq_lens.values())) > 1:
            raise ValueError(f"the datasets of one mixture must share a row length, got {seq_lens}")
        eos = {name: sources[name].eos_token_id for name in self.names}
        if len(set(eos.values())) > 1:
            raise ValueError(f"the datasets of one mixture must come from one tokenizer, EOS ids differ: {eos}")
        self.sources = [sources[name] for name in self.names]
        self.seq_len = seq_lens[self.names[0]] if self.names else 0
        offsets = dict(offsets or {})
        picks = [stream_rows(len(source), offsets.get(name, 0), rows[name], seed=seed, name=name)
                 for name, source in zip(self.names, self.sources)]
        source_index = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(picks)]) \
            if picks else np.empty(0, dtype=np.int32)
        row_index = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
        order = np.random.default_rng(shuffle_seed).permutation(len(row_index))
        self.source_index, self.row_index = source_index[order], row_index[order]
        # passes over each dataset once this mixture is consumed (> 1: it repeats rows)
        self.passes = {name: (offsets.get(name, 0) + rows[name]) / len(source)
                       for name, source in zip(self.names, self.sources)}

    def __len__(self) -> int:
        return len(self.row_index)

    def truncate(self, length: int) -> None:
        """Keep the first `length` rows of the order (whole optimizer steps)."""
        self.source_index, self.row_index = self.source_index[:length], self.row_index[:length]

    def source_of(self, index: int) -> str:
        return self.names[int(self.source_index[index])]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sources[int(self.source_index[index])][int(self.row_index[index])]


def open_phase(plan: PhasePlan, *, seed: int, cache: dict[str, PackedDataset] | None = None) -> MixtureDataset:
    """The MixtureDataset of a planned phase, truncated to whole steps; checks the packed datasets fit the plan."""
    cache = {} if cache is None else cache
    sources: dict[str, PackedDataset] = {}
    problems = []
    for name, path in plan.dataset_paths.items():
        if name not in cache:
            if not (Path(path) / "manifest.json").exists():
                problems.append(f"{name!r}: no prepared dataset at {path} (run `yulan-tune prepare-data ... --out "
                                f"{path} --seq-len {plan.seq_len}`)")
                continue
            cache[name] = PackedDataset(path)
        if cache[name].seq_len != plan.seq_len:
            problems.append(f"{name!r}: {path} has rows of {cache[name].seq_len} tokens, phase {plan.name!r} "
                            f"needs {plan.seq_len}")
        sources[name] = cache[name]
    if problems:
        raise CurriculumError(f"phase {plan.name!r}: " + "; ".join(problems))
    mixture = MixtureDataset(sources, plan.rows, seed=seed, shuffle_seed=[seed, plan.index], offsets=plan.offsets)
    mixture.truncate(plan.steps * plan.rows_per_step)
    return mixture


def stream_names(sources: list[str]) -> dict[str, str]:
    """The name each source's row stream is seeded with (`stream_rows`): its file or directory name, so the data
    order depends on the seed and the data, not on where the files live; sources sharing a name get their position
    in the mix appended."""
    names = {source: Path(source).name or source for source in sources}
    counts = {name: list(names.values()).count(name) for name in names.values()}
    return {source: name if counts[name] == 1 else f"{name}#{i}" for i, (source, name) in enumerate(names.items())}


def mixture_composition(mixture: MixtureDataset, weights: Mapping[str, float],
                        names: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per source: weight, rows, tokens, available rows, passes over it (> 1: rows repeat; reported, not hidden).
    `names`: source -> its name in the mixture (default: the same)."""
    names = names or {source: source for source in weights}
    index = {name: i for i, name in enumerate(mixture.names)}
    result = {}
    for source, weight in weights.items():
        i = index[names[source]]
        rows = int((mixture.source_index == i).sum())
        result[source] = {"weight": weight, "rows": rows, "tokens": rows * mixture.seq_len,
                          "available_rows": len(mixture.sources[i]), "passes": mixture.passes[names[source]]}
    return result
