"""`yulan-tune merge`: merge a LoRA adapter into its base and save a plain model (yulan_tune.export)."""

from __future__ import annotations

import argparse

from yulan_tune.console import summary
from yulan_tune.export import merge_adapter
from yulan_tune.export.hf import __doc__ as EXPORT_DOC


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune merge", description=EXPORT_DOC)
    parser.add_argument("--adapter", required=True, help="LoRA adapter dir (an SFT/DPO output with use_peft)")
    parser.add_argument("--out", required=True, help="output dir for the merged model")
    parser.add_argument("--base", default=None, help="base model (default: the one the adapter records)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dequantize", dest="dequantize", action="store_true", default=None,
                       help="merge into the dequantized 4-bit base (default for QLoRA adapters)")
    group.add_argument("--no-dequantize", dest="dequantize", action="store_false",
                       help="merge into the original bf16 base weights")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter, args.out, base=args.base, dequantize=args.dequantize)
    summary("merge", [f"wrote {out}"])
    return 0
