"""`yulan-tune tiny`: build the offline tiny YuLan (tokenizer + briefly pretrained model) into a directory."""

from __future__ import annotations

import argparse
import time

from yulan_tune.console import elapsed, summary
from yulan_tune.tiny import build_tiny, default_tiny_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune tiny", description="Build the offline tiny YuLan.")
    parser.add_argument("--out", default=None, help=f"output dir (default: {default_tiny_dir()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if the dir holds a complete build")
    args = parser.parse_args(argv)
    started = time.time()
    out = build_tiny(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps, force=args.force)
    summary("tiny", [f"tiny YuLan at {out} ({elapsed(started)})"])
    return 0
