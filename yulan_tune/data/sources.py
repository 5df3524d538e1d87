"""One source of a data mix as a packed dataset: a `prepare-data` output as it is, anything else tokenized and packed
once into a cache (raw JSONL / Parquet / text files or directories, and the bundled document sets)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from yulan_tune.data.bundled import bundled_documents, is_bundled, write_documents_jsonl
from yulan_tune.data.packed import PackedDataset
from yulan_tune.data.packing import prepare_packed_dataset
from yulan_tune.paths import cache_home


def _packed_cache_dir(source: Path, tokenizer_dir: Path, seq_len: int, text_field: str, txt_split: str,
                      root: Path) -> Path:
    stat = source.stat()
    key = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, str(tokenizer_dir.resolve()), seq_len,
                      text_field] + ([txt_split] if txt_split != "file" else []))  # older caches keep their key
    return root / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def pack_source(source: str, tokenizer_dir: Path, seq_len: int, *, cache_root: Path | None = None,
                text_field: str = "text", txt_split: str = "file") -> PackedDataset:
    """A packed dataset for one source: a `prepare-data` output dir is used as is (its row length must equal
    seq_len); raw files and dirs are tokenized and packed once into `cache_root` (EOS between documents). The bundled
    document sets (`yulan_tune.data.bundled.DOCUMENT_SETS`) are written out as JSONL first. The cache defaults to
    `$YULAN_TUNE_HOME/packed`."""
    cache_root = cache_root if cache_root is not None else cache_home() / "packed"
    if is_bundled(source):
        bundled = cache_root / f"{source.replace(':', '-')}.jsonl"
        write_documents_jsonl(bundled_documents(source), bundled)
        source, text_field = str(bundled), "text"
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    if (path / "manifest.json").is_file():
        packed = PackedDataset(path)
        if packed.seq_len != seq_len:
            raise ValueError(f"data source {source}: packed with seq_len {packed.seq_len}, this run uses seq_len "
                             f"{seq_len}; pack it again with `yulan-tune prepare-data --seq-len {seq_len}` or pass "
                             "the raw files")
        return packed
    out = _packed_cache_dir(path, tokenizer_dir, seq_len, text_field, txt_split, cache_root)
    manifest = prepare_packed_dataset([path], tokenizer_dir, out, seq_len=seq_len, text_field=text_field,
                                      txt_split=txt_split, num_workers=1, progress=False)
    if manifest["rows"] == 0:
        raise ValueError(f"data source {source}: {manifest['tokenized_tokens']} tokens, less than one row of "
                         f"{seq_len}; add data or lower seq_len")
    return PackedDataset(out)
