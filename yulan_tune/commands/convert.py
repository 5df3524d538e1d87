"""`yulan-tune convert --to llama|yulanmini IN OUT`: between YuLan-Mini's training form and its released Llama form."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from yulan_tune.modeling.convert import from_llama, load_for_conversion, max_logit_difference, save_converted, to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str]) -> int:
    """`yulan-tune convert --to llama|yulanmini IN OUT`: 0 on success, 1 if the outputs changed, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="yulan-tune convert",
        description="Convert between YuLan-Mini's training form (yulanmini) and its released Llama form.")
    parser.add_argument("--to", required=True, choices=["llama", "yulanmini"], help="target form")
    parser.add_argument("source", help="model directory to convert")
    parser.add_argument("out_dir", help="directory to write (safetensors, config, tokenizer files)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="auto", help="output dtype (default: source's)")
    parser.add_argument("--tie-word-embeddings", action="store_true",
                        help="--to yulanmini: tie lm_head to the embedding as in training (needs them proportional)")
    parser.add_argument("--scale-emb", type=float, default=10.0, help="--to yulanmini: embedding multiplier")
    parser.add_argument("--dim-model-base-lr", type=int, default=256, help="--to yulanmini: muP base width")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing logits of source and result")
    args = parser.parse_args(argv)

    dtype = _DTYPES[args.dtype]
    try:
        if args.to == "llama":
            source, _ = load_for_conversion(args.source, YuLanMiniForCausalLM)
            result = to_llama(source, None, dtype=dtype)
        else:
            source, _ = load_for_conversion(args.source, LlamaForCausalLM)
            result = from_llama(source, None, dtype=dtype, scale_emb=args.scale_emb,
                                dim_model_base_lr=args.dim_model_base_lr,
                                tie_word_embeddings=args.tie_word_embeddings)
    except TypeError as error:  # a model of the other form: a user error like the others
        raise ValueError(str(error)) from error
    save_converted(result, args.out_dir, Path(args.source))
    print(f"convert: wrote {args.to} model to {args.out_dir} ({sum(p.numel() for p in result.parameters()):,} "
          f"parameters, {result.dtype})")
    if args.no_verify:
        return 0
    difference, scale = max_logit_difference(source, result)
    # a wrong conversion changes logits by O(1) relative; rounding of a 16-bit cast stays far below 10%
    tolerance = (1e-4 if result.dtype == torch.float32 and source.dtype == torch.float32 else 1e-1) * max(scale, 1.0)
    print(f"convert: max |logit difference| on 64 random tokens: {difference:.3g} (max |logit| {scale:.3g})")
    if difference > tolerance:
        print(f"yulan-tune convert: error: outputs changed beyond {tolerance:.3g}", file=sys.stderr)
        return 1
    return 0
