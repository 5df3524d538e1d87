"""`yulan-tune export SOURCE --to gguf|hf --out PATH`: a model ready to serve (yulan_tune.export).

SOURCE is a Llama model directory, a LoRA adapter (merged into its base first; a QLoRA adapter into the dequantized
4-bit weights), a yulanmini checkpoint (folded into the released Llama form first), or "tiny".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from yulan_tune.console import elapsed, summary
from yulan_tune.export.gguf import GGUF_DTYPES, write_gguf
from yulan_tune.export.hf import load_for_export, save_hf
from yulan_tune.export.ollama import write_modelfile
from yulan_tune.tiny import resolve_tiny

_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_GGUF_DTYPE = "f16"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:.2f} GiB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="yulan-tune export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help='model dir, LoRA adapter dir, yulanmini checkpoint, or "tiny"')
    parser.add_argument("--to", required=True, choices=["gguf", "hf"],
                        help="gguf: one file for llama.cpp / Ollama; hf: a merged plain Llama dir (vLLM, SGLang)")
    parser.add_argument("--out", required=True, help="the .gguf file (--to gguf) or the directory (--to hf)")
    parser.add_argument("--dtype", default=None, help=f"gguf: {'|'.join(GGUF_DTYPES)} (default {DEFAULT_GGUF_DTYPE}); "
                        "hf: f32|f16|bf16 (default: the source's; bf16 for a merged adapter)")
    parser.add_argument("--ollama", action="store_true", help="--to gguf: also write a Modelfile next to the file")
    parser.add_argument("--base", default=None, help="adapter: its base model (default: the one it records)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dequantize", dest="dequantize", action="store_true", default=None,
                       help="adapter: merge into the dequantized 4-bit base (default for QLoRA adapters)")
    group.add_argument("--no-dequantize", dest="dequantize", action="store_false",
                       help="adapter: merge into the original base weights")
    args = parser.parse_args(argv)
    started = time.time()

    if args.to == "gguf":
        dtype = args.dtype or DEFAULT_GGUF_DTYPE
        if dtype not in GGUF_DTYPES:
            raise ValueError(f"--dtype for --to gguf must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
        if Path(args.out).is_dir():
            raise IsADirectoryError(f"--out {args.out} is a directory; --to gguf writes one file (e.g. model.gguf)")
        load_dtype = torch.float32  # merged / folded in f32, rounded once when written
    else:
        if args.ollama:
            raise ValueError("--ollama goes with --to gguf (Ollama runs GGUF files)")
        if args.dtype is not None and args.dtype not in _TORCH_DTYPES:
            raise ValueError(f"--dtype for --to hf must be one of {', '.join(_TORCH_DTYPES)}, got {args.dtype!r}")
        load_dtype = _TORCH_DTYPES.get(args.dtype)
    source = resolve_tiny(args.source, "model")
    model, tokenizer, kind = load_for_export(source, dtype=load_dtype, base=args.base, dequantize=args.dequantize)
    what = {"adapter": "adapter merged into its base", "yulanmini": "yulanmini folded into Llama",
            "llama": "Llama model"}[kind]
    parameters = sum(p.numel() for p in model.parameters())
    if args.to == "hf":
        out = save_hf(model, tokenizer, args.out)
        summary("export", [f"{what} {source} ({parameters:,} parameters) -> {out} ({model.dtype}, safetensors) "
                           f"in {elapsed(started)}",
                           f"serve: vllm serve {out}   |   python -m sglang.launch_server --model-path {out}"])
        return 0
    info = write_gguf(model, tokenizer, args.out, dtype=dtype, name=Path(source).name)
    lines = [f"{what} {source} ({parameters:,} parameters) -> {info['path']} ({dtype}, {info['tensors']} tensors, "
             f"{_size(info['bytes'])}) in {elapsed(started)}",
             f"tokenizer: byte-level BPE, pre-tokenizer {info['pre_tokenizer']}, special ids {info['special_ids']}"]
    if args.ollama:
        modelfile = write_modelfile(info["path"], tokenizer, context_length=model.config.max_position_embeddings,
                                    generation_config=model.generation_config)
        lines.append(f"ollama: {modelfile} (ollama create NAME -f {modelfile})")
    summary("export", lines)
    return 0
