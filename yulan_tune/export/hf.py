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
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.modeling.convert import to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM

ADAPTER_INFO = "yulan_tune_adapter.json"  # written next to an adapter by the recipes: base and its quantization
ADAPTER_CONFIG = "adapter_config.json"  # peft's


def write_adapter_info(adapter_dir: str | Path, base: str, quantization: str | None) -> None:
    Path(adapter_dir, ADAPTER_INFO).write_text(json.dumps({"base": base, "quantization": quantization}, indent=2))


def read_adapter_info(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir, ADAPTER_INFO)
    return json.loads(path.read_text()) if path.exists() else {}


def merged_model(
    adapter_dir: str | Path,
    *,
    base: str | None = None,
    dequantize: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base + adapter, merged, in `dtype`, and the adapter's tokenizer (else the base's)."""
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
    tokenizer = load_tokenizer(adapter_dir if Path(adapter_dir, "tokenizer_config.json").exists() else base)
    return model, tokenizer


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dequantize: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write base + adapter, merged, in `dtype` (bf16 by default) with the adapter's tokenizer. Returns `out_dir`."""
    model, tokenizer = merged_model(adapter_dir, base=base, dequantize=dequantize, dtype=dtype)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def source_kind(source: str | Path) -> str:
    """"adapter", "yulanmini" or "llama" for a directory; a user error (one line) for anything else."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such directory (a Llama model, a LoRA adapter or a yulanmini checkpoint)")
    if not path.is_dir():
        raise NotADirectoryError(f"{source}: not a directory (a Llama model, a LoRA adapter or a yulanmini checkpoint)")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{source}: neither a model directory (no config.json) nor a LoRA adapter "
                                f"(no {ADAPTER_CONFIG})")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ("llama", "yulanmini"):
        raise ValueError(f"{config}: model_type {model_type!r}; export writes the Llama architecture of YuLan-Mini "
                         "(model_type 'llama', or a 'yulanmini' checkpoint folded into it)")
    return model_type


def as_llama(model: PreTrainedModel, dtype: torch.dtype) -> LlamaForCausalLM:
    if isinstance(model, YuLanMiniForCausalLM):
        return to_llama(model, None, dtype=dtype)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"export writes Llama models; this is a {type(model).__name__}")
    return model.to(dtype)


def load_for_export(
    source: str | Path,
    *,
    dtype: torch.dtype | None = None,
    base: str | None = None,
    dequantize: bool | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, str]:
    """(plain Llama, tokenizer, kind of source) for a Llama directory, a LoRA adapter (merged into its base, the
    dequantized 4-bit weights for a QLoRA adapter) or a yulanmini checkpoint (folded with `to_llama`).

    `dtype`: of the returned model (default: the source's; bf16 for a merged adapter, as `merge_adapter`).
    """
    kind = source_kind(source)
    if kind == "adapter":
        model, tokenizer = merged_model(source, base=base, dequantize=dequantize, dtype=dtype or torch.bfloat16)
    else:
        model_class = YuLanMiniForCausalLM if kind == "yulanmini" else LlamaForCausalLM
        model = model_class.from_pretrained(str(source), dtype="auto" if dtype is None else dtype)
        tokenizer = load_tokenizer(source)
    model = as_llama(model.eval(), dtype or model.dtype)
    return model, tokenizer, kind


def save_hf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """A plain Llama directory (safetensors, config, generation config, tokenizer with its chat template): what
    `AutoModelForCausalLM`, vLLM and SGLang load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
