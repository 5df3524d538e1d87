"""Load YuLan models and tokenizers from a hub id or a local directory, the same way everywhere in the SDK.

Guarantees: the chat template is the model's own when its tokenizer has one, else the canonical YuLan-Mini-Instruct
template; the pad token is never the end-of-sequence / end-of-turn token (training would otherwise stop learning to
end turns); a model that cannot be found offline fails with one line that says what was looked for and what to do.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.conventions import YULAN_PAD_TOKEN
from yulan_tune.data.chat import end_of_turn_ids
from yulan_tune.paths import CHAT_TEMPLATE_DIR, DEFAULT_CHAT_TEMPLATE

# The YuLan-Mini README's example system prompt (docs/yulan_reference.md section 6)
YULAN_SYSTEM_PROMPT = "You are YuLan-Mini, created by RUC AI Box. You are a helpful assistant."


class ModelNotFoundError(FileNotFoundError):
    pass


def _not_found(name_or_path: str | os.PathLike, cause: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load {str(name_or_path)!r}: no such local directory, and the hub is not reachable or has no such "
        f"repo ({type(cause).__name__}). Pass a local model directory (e.g. `yulan-tune tiny --out DIR` builds the "
        f"offline tiny YuLan), or download it where the hub is reachable: "
        f"`huggingface-cli download {name_or_path} --local-dir DIR`."
    )


def _check_local_path(name_or_path: str | os.PathLike) -> None:
    """A value that can only be a filesystem path (absolute, ./, ../, ~, or more than one '/') fails at once when
    missing, instead of after the hub client's retries; "org/name" stays a hub id."""
    text = str(name_or_path)
    looks_local = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local and not Path(text).expanduser().exists():
        raise ModelNotFoundError(
            f"could not load {text!r}: no such local directory. Pass an existing model directory (e.g. "
            "`yulan-tune tiny --out DIR` builds the offline tiny YuLan) or a hub id such as "
            "yulan-team/YuLan-Mini-Instruct."
        )


def read_chat_template(name_or_path: str | os.PathLike) -> str:
    """A template given as a path to a .jinja file, or one of the names in chat_templates/ (without .jinja)."""
    path = Path(name_or_path)
    if not path.exists():
        path = CHAT_TEMPLATE_DIR / f"{name_or_path}.jinja"
    if not path.exists():
        known = sorted(p.stem for p in CHAT_TEMPLATE_DIR.glob("*.jinja"))
        raise FileNotFoundError(f"chat template {str(name_or_path)!r} not found (a .jinja path or one of {known})")
    return path.read_text(encoding="utf-8")


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    chat_template: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template and a pad token distinct from eos / <|eot_id|>.

    `chat_template` (a name in chat_templates/ or a .jinja path) overrides; otherwise the tokenizer's own template
    wins and the YuLan-Mini-Instruct template is the fallback.
    """
    _check_local_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    except OSError as error:
        raise _not_found(name_or_path, error) from error
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in end_of_turn_ids(tokenizer):
        if YULAN_PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = YULAN_PAD_TOKEN
        else:  # a non-YuLan tokenizer without a usable pad: add one rather than reuse eos
            tokenizer.add_special_tokens({"pad_token": YULAN_PAD_TOKEN})
    return tokenizer


QUANTIZATIONS = (None, "4bit", "8bit")


def quantization_config(quantization: str | None, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings for "4bit" (QLoRA: NF4 with double quantization, Dettmers et al. 2023) or "8bit",
    built by trl's `get_quantization_config` from its `ModelConfig` fields, as the recipes' configs carry them."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
    if quantization is None:
        return None
    from trl import ModelConfig, get_quantization_config

    return get_quantization_config(ModelConfig(
        load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit", bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True, dtype=compute_dtype))


def quantization_name(model_args: Any) -> str | None:
    """"4bit" / "8bit" / None from trl ModelConfig fields (`load_in_4bit`, `load_in_8bit`)."""
    return "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None


def default_dtype() -> torch.dtype:
    """bf16 where the hardware has it, else fp32 (CPU fp32 is the fast and exact choice for the tiny model)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def default_attn_implementation(dtype: torch.dtype) -> str | None:
    """"flash_attention_2" on a CUDA device with flash-attn installed and a 16-bit dtype: its varlen kernels attend
    within each document of a padding-free packed batch without a [tokens, tokens] mask; else None (transformers'
    default, SDPA, which the packed batches reach through position_ids)."""
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash and dtype in (torch.bfloat16, torch.float16) else None


def load_model(
    name_or_path: str | os.PathLike,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    adapter: str | os.PathLike | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a hub id or local dir, optionally 4/8-bit quantized and with an (unmerged) LoRA adapter.

    yulanmini checkpoints load too: importing yulan_tune registers the architecture with the Auto classes.
    `attn_implementation` None or "auto": flash-attention where it applies (`default_attn_implementation`).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype) if dtype != "auto" else None
    _check_local_path(name_or_path)
    dtype = dtype or default_dtype()
    if attn_implementation in (None, "auto"):
        attn_implementation = default_attn_implementation(dtype)
    if quantization is not None and device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}
    if quantization is not None:
        # only when asked: an explicit quantization_config=None makes transformers ignore the one saved in a
        # pre-quantized checkpoint's config.json (a saved 4-bit model then fails to load with size mismatches)
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except OSError as error:
        raise _not_found(name_or_path, error) from error
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model
