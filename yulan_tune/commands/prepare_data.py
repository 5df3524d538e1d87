"""`yulan-tune prepare-data`: tokenize and pack raw corpora for pretraining (yulan_tune.data.packing)."""

from __future__ import annotations

import argparse
import os
import time

from yulan_tune.console import elapsed, summary
from yulan_tune.data.packing import prepare_packed_dataset
from yulan_tune.data.records import BAD_ROW_POLICIES, TXT_SPLITS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="yulan-tune prepare-data",
        description="Tokenize raw corpora (no special tokens, EOS between documents), pack them into fixed-length "
                    "rows and write memory-mapped shards for pretraining. Rerun the same command to resume.",
    )
    parser.add_argument("sources", nargs="+", help="JSONL / Parquet / .txt files, directories of them, `datasets` "
                                                   "directories (save_to_disk), or hub dataset names")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed row (default 4096)")
    parser.add_argument("--text-field", default="text", help="JSONL / Parquet / datasets column with the text")
    parser.add_argument("--split", default="train", help="split of a `datasets` directory or hub dataset")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="worker processes")
    parser.add_argument("--memory-budget-mb", type=float, default=1024,
                        help="memory for data in flight across all workers, on top of the libraries (default 1024)")
    parser.add_argument("--unit-mb", type=float, default=256, help="input MB per work unit (resume granularity)")
    parser.add_argument("--segment-chars", type=int, default=2**20,
                        help="longest text tokenized in one piece; longer documents are cut at token boundaries")
    parser.add_argument("--on-bad-rows", choices=BAD_ROW_POLICIES, default="raise",
                        help="stop at the first bad row (raise, the default), or count and skip bad rows (skip)")
    parser.add_argument("--txt-split", choices=TXT_SPLITS, default="file",
                        help="plain-text files: one document per file (default), or documents separated by blank lines")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    started = time.time()
    manifest = prepare_packed_dataset(
        args.sources, args.tokenizer, args.out, seq_len=args.seq_len, text_field=args.text_field,
        split=args.split, num_workers=args.workers, memory_budget_mb=args.memory_budget_mb, unit_mb=args.unit_mb,
        segment_chars=args.segment_chars, on_bad_rows=args.on_bad_rows, txt_split=args.txt_split,
        progress=not args.no_progress,
    )
    skipped = sum(manifest["bad_rows"].values())
    lines = [f"{manifest['documents']:,} documents -> {manifest['rows']:,} rows of {manifest['seq_len']} tokens "
             f"({manifest['tokens']:,} tokens) in {args.out} ({elapsed(started)})",
             f"dropped {manifest['dropped_final_partial_row_tokens']} tokens of the final partial row; "
             f"{manifest['empty_documents']} empty documents; {skipped} bad rows skipped"
             + (f" {manifest['bad_rows']}, e.g. {manifest['bad_row_examples'][0]}" if skipped else "")]
    if manifest["ignored_files"]:
        lines.append(f"ignored {len(manifest['ignored_files'])} files that are not data: "
                     f"{', '.join(manifest['ignored_files'][:3])}")
    summary("prepare-data", lines)
    return 0
