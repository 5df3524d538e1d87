"""`yulan-tune clean INPUT... --out DIR [--config FILE] [--decontaminate SOURCE...]`: clean raw pretraining text
with datatrove (yulan_tune.data.cleaning); the kept documents feed `yulan-tune prepare-data DIR/kept`."""

from __future__ import annotations

import argparse
import os
import time

from yulan_tune.console import METRICS_FILE, elapsed, summary, write_metrics
from yulan_tune.data.cleaning import (
    HELDOUT_MATH,
    LM_EVAL_PREFIX,
    CleanRecipe,
    format_table,
    parse_config,
    resolve_eval_texts,
)


def _lm_eval_texts(task: str):
    # lm-eval task data is read from the local cache only: cleaning never waits on the hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from yulan_tune.evaluation.harness import task_texts

    return task_texts([task])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="yulan-tune clean",
        description="Clean raw text with datatrove: Unicode normalization, heuristic quality filters (Gopher, C4, "
                    "FineWeb), n-gram decontamination, exact and MinHash deduplication, quality scoring. Kept "
                    "documents go to DIR/kept/, removed ones to DIR/removed/<stage>/. Rerun the command to resume.",
    )
    parser.add_argument("inputs", nargs="+", help="JSONL / Parquet / text files or directories of them")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="YAML settings (recipes/configs/clean_web.yaml, clean_code.yaml, "
                                         "clean_math.yaml); without one, clean_web's stages run")
    parser.add_argument("--decontaminate", nargs="+", default=[], metavar="SOURCE",
                        help=f"evaluation sets whose 13-grams are removed: {HELDOUT_MATH} (the bundled held-out "
                             f"math), a JSONL / Parquet / text file, or {LM_EVAL_PREFIX}<task> (cached lm-eval data)")
    parser.add_argument("--workers", type=int, help="processes at a time (default: the config's, 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run of other settings in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    started = time.time()

    trl_argv = (["--config", args.config] if args.config else []) + ["--inputs", *args.inputs,
                                                                     "--output_dir", args.out] + overrides
    if args.workers is not None:
        trl_argv += ["--workers", str(args.workers)]
    config = parse_config(trl_argv)
    config.decontaminate = list(dict.fromkeys([*config.decontaminate, *args.decontaminate]))
    eval_texts = resolve_eval_texts(config.decontaminate, _lm_eval_texts) if config.decontaminate else None

    result = CleanRecipe(config, eval_texts, progress=not args.no_progress).run(overwrite=args.overwrite)
    write_metrics(args.out, result)
    read, kept = result["documents_read"], result["documents_kept"]
    lines = format_table(result["stages"])
    lines.append(f"{kept:,} of {read:,} documents kept in {result['kept_dir']}; removed ones in "
                 f"{result['removed_dir']}/<stage>/ ({elapsed(started)}, {result['documents_per_second']} docs/s)")
    if result["score_buckets"]:
        lines.append("score buckets: " + ", ".join(f"{k} {v:,}" for k, v in result["score_buckets"].items()))
    if result["ignored_files"]:
        lines.append(f"ignored {len(result['ignored_files'])} files that are not data: "
                     f"{', '.join(result['ignored_files'][:3])}")
    if result["decontamination_index"]:
        lines.append("decontamination index: " + ", ".join(
            f"{task} {n:,} {config.decontamination_ngrams}-grams" for task, n in result["decontamination_index"].items()))
    lines.append(f"next: yulan-tune prepare-data {result['kept_dir']} --tokenizer ... ; metrics in "
                 f"{os.path.join(args.out, METRICS_FILE)}")
    summary("clean", lines)
    return 0
