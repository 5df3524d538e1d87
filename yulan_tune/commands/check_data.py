"""`yulan-tune check-data FILE`: validate an SFT dataset, count and measure it, show a sample with trained spans."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from yulan_tune.conventions import IGNORE_INDEX
from yulan_tune.data.formats import SFT_FORMATS, length_stats, load_sft_examples, render_trained_spans, tokenize_example
from yulan_tune.data.records import TXT_SPLITS, DataFormatError, parse_columns
from yulan_tune.loading import load_tokenizer
from yulan_tune.tiny import TINY, resolve_tiny


def _config_values(config_path: str | None) -> dict[str, Any]:
    if not config_path:
        return {}
    with open(config_path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise DataFormatError(config_path, f"expected a YAML mapping of config fields, got {type(values).__name__}")
    return values


def main(argv: list[str]) -> int:
    """`yulan-tune check-data FILE`: validate, count, measure token lengths, show one sample with trained spans.

    Exit code 0 when every row is usable, 1 when some rows would be skipped or have nothing to train on.
    """
    parser = argparse.ArgumentParser(prog="yulan-tune check-data", description=main.__doc__)
    parser.add_argument("data", help="JSONL / JSON / Parquet / CSV file, a directory of them, or a datasets dir")
    parser.add_argument("--config", help="recipe YAML: model_name_or_path, max_length, chat_template and columns "
                                          "are read")
    parser.add_argument("--model", help="model dir or hub id whose tokenizer to use (default: the tiny YuLan)")
    parser.add_argument("--max-length", type=int, help="token limit to check against (default: config max_length)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--sample", type=int, default=0, help="index of the valid sample to render")
    parser.add_argument("--txt-split", choices=TXT_SPLITS, default="file",
                        help="plain-text files: one `text` row per file (default), or per blank-line-separated block")
    parser.add_argument("--columns", help="the dataset's column names for our fields, e.g. "
                                          "'prompt=question,completion=answer' (default: the config's columns)")
    args = parser.parse_args(argv)

    config = _config_values(args.config)
    model = args.model or config.get("model_name_or_path")
    max_length = args.max_length or config.get("max_length")
    model = resolve_tiny(model or TINY, "model")
    tokenizer = load_tokenizer(model, chat_template=config.get("chat_template"))

    columns = parse_columns(args.columns or config.get("columns"))
    examples, report = load_sft_examples(args.data, on_bad_rows="skip", split=args.split, columns=columns,
                                         txt_split=args.txt_split)
    formats = {name: 0 for name in SFT_FORMATS}
    for example in examples:
        formats[example.format] += 1
    print(f"{args.data}: {len(examples)} valid samples, {report.total_skipped} skipped")
    print("formats: " + ", ".join(f"{name} {count}" for name, count in formats.items() if count))
    tokenized = [tokenize_example(tokenizer, example) for example in examples]
    lengths = [len(ids) for ids, _ in tokenized]
    trained = [sum(label != IGNORE_INDEX for label in labels) for _, labels in tokenized]
    for example, n_trained in zip(examples, trained):
        if n_trained == 0:
            report.add("no_trainable_tokens", example.where, "no token has a label (no assistant content)")
    if max_length:
        for example, length in zip(examples, lengths):
            if length > max_length:
                report.add("too_long", example.where, f"{length} tokens > max_length {max_length}")
    if lengths:
        stats = length_stats(lengths)
        print("tokens per sample: " + ", ".join(f"{k} {v:g}" for k, v in stats.items()) + f" (tokenizer: {model})")
        print(f"trained tokens: {sum(trained)} of {sum(lengths)} ({sum(trained) / max(1, sum(lengths)):.1%})")
    if report:
        print("problems:\n" + report.summary())
    else:
        print("problems: none")
    if tokenized:
        index = min(max(args.sample, 0), len(tokenized) - 1)
        ids, labels = tokenized[index]
        print(f"\nsample {index} ({examples[index].where}, {examples[index].format}); trained tokens in «»:")
        print(render_trained_spans(tokenizer, ids, labels))
    return 1 if report or not examples else 0