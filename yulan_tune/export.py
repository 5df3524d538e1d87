"""Merge a LoRA adapter into its base and save a plain model that loads with `AutoModelForCausalLM`.

An adapter trained on a 4-bit base (QLoRA) learned its update against the *dequantized* NF4 weights, so by default
it is merged into exactly those: the base is loaded in 4-bit as in training, dequantized to bf16, and only then
merged. Merging is never done onto quantized weights (that would re-round the update away), and `--no-dequantize`
merges into the original bf16 weights instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from yulan_tune.loading import load_model, load_tokenizer

ADAPTER_INFO = "yulan_tune_adapter.json"  # written next to an adapter by the recipes: base and its quantization


def write_adapter_info(adapter_dir: str | Path, base: str, quantization: str | None) -> None:
    Path(adapter_dir, ADAPTER_INFO).write_text(json.dumps({"base": base, "quantization": quantization}, indent=2))


def read_adapter_info(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir, ADAPTER_INFO)
    return json.loads(path.read_text()) if path.exists() else {}


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dequantize: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write base + adapter, merged, in `dtype` (bf16 by default) with the adapter's tokenizer. Returns `out_dir`."""
    from peft import PeftConfig, PeftModel

    info = read_adapter_info(adapter_dir)
    base = base or info.get("base") or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    trained_on = info.get("quantization")
    dequantize = trained_on == "4bit" if dequantize is None else dequantize
    if dequantize:
        # the 4-bit weights the adapter was trained against, dequantized to `dtype` before merging
        model = load_model(base, quantization="4bit", dtype=dtype).dequantize()
    else:
        model = load_model(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(adapter_dir if Path(adapter_dir, "tokenizer_config.json").exists() else base).save_pretrained(
        str(out)
    )
    return out
