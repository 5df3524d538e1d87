"""Reading a packed pretraining dataset (written by `yulan_tune.data.packing`): fixed-length rows of token ids in
memory-mapped shards, with `position_ids` that restart after every EOS (one document ends, the next starts).

Directory layout:
    manifest.json          settings, shards (file, rows), totals, every skipped row / file counted
    shards/unit-00000.bin  rows x seq_len token ids, uint16 when the vocabulary fits, else uint32
    shards/tail.bin        the rows packed from all units' leftovers
    work/                  plan + per-unit records (resume bookkeeping of the preparation)
A directory is complete once `manifest.json` exists (it is written last).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "yulan_tune.packed"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def packed_position_ids(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Positions restarting at 0 at the row start and after every EOS (the first token of the next document)."""
    ids = np.asarray(input_ids)
    index = np.arange(ids.shape[-1])
    starts = np.zeros(ids.shape, dtype=bool)
    starts[..., 0] = True
    starts[..., 1:] = ids[..., :-1] == eos_token_id
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return index - last_start


class PackedDataset:
    """Map-style dataset over a prepared directory: row `i` -> `input_ids`, `labels` (= inputs; the model shifts)
    and `position_ids`, each a LongTensor of `seq_len`. Shards are memory-mapped (a few at a time, least recently
    used first out) so random access costs no more memory than the pages read."""

    MAX_OPEN_SHARDS = 64

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = (" (an unfinished preparation: rerun prepare-data to resume it)"
                    if (self.path / "work" / "plan.json").exists() else "")
            raise FileNotFoundError(f"{self.path}: no manifest.json, not a prepared dataset{hint}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')} v{self.manifest.get('version')},"
                             f" expected {FORMAT_NAME} v{FORMAT_VERSION}")
        self.seq_len: int = self.manifest["seq_len"]
        self.eos_token_id: int = self.manifest["eos_token_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._files = [self.path / shard["file"] for shard in self.manifest["shards"]]
        self._rows = np.array([shard["rows"] for shard in self.manifest["shards"]], dtype=np.int64)
        self._ends = np.cumsum(self._rows)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def _shard(self, index: int) -> np.memmap:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        rows = int(self._rows[index])
        shard = np.memmap(self._files[index], dtype=self.dtype, mode="r", shape=(rows, self.seq_len))
        self._open[index] = shard
        if len(self._open) > self.MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def row(self, index: int) -> np.ndarray:
        """Token ids of row `index` (a copy, as int64)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {self.path} ({len(self)} rows)")
        index %= len(self)
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        return np.asarray(self._shard(shard)[local], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.row(int(index))
        input_ids = torch.from_numpy(ids)
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "position_ids": torch.from_numpy(packed_position_ids(ids, self.eos_token_id)),
        }

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own memory maps
        return {**self.__dict__, "_open": OrderedDict()}
