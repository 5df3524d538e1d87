"""Write a plain Llama (YuLan-Mini's released form) and its tokenizer to one GGUF file for llama.cpp and Ollama.

Written with the `gguf` package alone (no llama.cpp build, no converter script), following the layout llama.cpp's
`llama` architecture reads:

- tensors under llama.cpp's names (`gguf.get_tensor_name_map`): `token_embd`, `blk.N.attn_q` ... `output`; the q/k
  projections, weights *and biases*, reordered from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved
  pairs (per head, rows `[0, d/2, 1, d/2+1, ...]`); YuLan's q/k/v biases and the (zero) o_proj bias are kept;
- hyperparameters: context length, widths, heads and KV heads (GQA), head_dim, RMSNorm epsilon, RoPE base;
- the tokenizer: a byte-level BPE as `tokenizer.ggml.model = "gpt2"` with an explicit pre-tokenizer name that
  llama.cpp knows (`llama-bpe` for Llama-3's split regex, the tiny YuLan's), every token with its type (YuLan's
  special tokens as CONTROL), the merges, BOS/EOS/PAD/UNK ids, `<|eot_id|>` as the end-of-turn token (llama.cpp
  stops generation on it), whether BOS is added, and the chat template.

Weights: `f32`, `f16`, `bf16` or `q8_0` for 2-D weights; 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them.
A tokenizer kind that GGUF's byte-level BPE cannot express (a SentencePiece model, Unigram, a normalizer, a
pre-tokenizer llama.cpp has no name for) is a one-line error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from yulan_tune.console import progress
from yulan_tune.conventions import END_OF_TURN_TOKEN

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_WEIGHT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Pre-tokenizer split regexes (as tokenizer.json stores them) -> the name llama.cpp's vocabulary loader knows.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_NAMES = {LLAMA3_SPLIT: "llama-bpe"}
# transformers' `{% generation %}` markers (assistant masks) are no-ops when rendering, and no other Jinja engine
# (llama.cpp's, Python's jinja2 in llama-cpp-python) knows the tag: the GGUF's template leaves them out.
_GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclasses.dataclass
class GGUFVocab:
    """The tokenizer as GGUF stores it."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, eot, pad, unk
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def gguf_chat_template(template: str | None) -> str | None:
    return None if template is None else _GENERATION_TAGS.sub("", template)


def _describe_pre_tokenizer(pre: dict | None) -> str:
    if pre is None:
        return "none"
    if pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe_pre_tokenizer(p) for p in pre["pretokenizers"]) + "]"
    return str(pre.get("type"))


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE, or a ValueError that names what it is."""
    steps = pre["pretokenizers"] if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        pattern = split.get("pattern", {}).get("Regex")
        if (pattern in PRE_TOKENIZER_NAMES and split.get("behavior") == "Isolated" and not split.get("invert")
                and not byte_level.get("use_regex") and not byte_level.get("add_prefix_space")):
            return PRE_TOKENIZER_NAMES[pattern]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    raise ValueError(f"the tokenizer's pre-tokenizer ({_describe_pre_tokenizer(pre)}) has no llama.cpp pre-tokenizer "
                     "name we can vouch for; supported: Llama-3's split regex + ByteLevel (llama-bpe), GPT-2's "
                     "ByteLevel (gpt-2)")


def _tokenizer_kind(model: dict, normalizer: dict | None, pre: dict | None) -> str:
    kind = model.get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        return "SentencePiece-style BPE (byte fallback)"
    if normalizer is not None or (kind == "BPE" and "Metaspace" in _describe_pre_tokenizer(pre)):
        return f"{kind} with a normalizer / Metaspace (SentencePiece-style)"
    if kind == "BPE" and "ByteLevel" in _describe_pre_tokenizer(pre):
        return "byte-level BPE"
    return str(kind)


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GGUFVocab:
    """The tokenizer in GGUF's terms, padded with unused tokens to the model's `vocab_size` (embedding rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model, normalizer, pre = spec["model"], spec.get("normalizer"), spec.get("pre_tokenizer")
    kind = _tokenizer_kind(model, normalizer, pre)
    if kind != "byte-level BPE":
        raise NotImplementedError(f"tokenizer kind {kind!r} cannot be written to GGUF by yulan_tune yet; supported: "
                                  "byte-level BPE (GPT-2 / Llama-3 style, as the tiny YuLan's)")
    pre_name = _pre_tokenizer_name(pre)
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_size} rows")
    by_id = {index: token for token, index in vocab.items()}
    added = {int(entry["id"]): entry for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # rows the tokenizer never produces (a vocabulary padded to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
               "unk": tokenizer.unk_token_id, "eot": vocab.get(END_OF_TURN_TOKEN)}
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return GGUFVocab(
        model="gpt2", pre=pre_name, tokens=tokens, token_types=[int(t) for t in types], merges=merges,
        special_ids={name: int(index) for name, index in special.items() if index is not None},
        add_bos=bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        add_eos=bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        chat_template=gguf_chat_template(tokenizer.chat_template),
    )


def permute_for_rope(tensor: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of a q/k projection (weight or bias) from Hugging Face's rotate-half order to llama.cpp's interleaved
    pairs: within each head, row i of the first half is followed by row i of the second half."""
    rows = tensor.shape[0]
    return (tensor.reshape(num_heads, 2, rows // num_heads // 2, *tensor.shape[1:])
            .swapaxes(1, 2).reshape(tensor.shape))


def ggml_type(shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors stay f32 (llama.cpp reads norms and biases in f32); 2-D weights take `dtype`, except a row whose
    length is not a multiple of the type's block (q8_0: 32), which falls back to f16."""
    if len(shape) < 2 or dtype == "f32":
        return gguf.GGMLQuantizationType.F32
    qtype = _WEIGHT_TYPES[dtype]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.F16


def _encode(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _rope_metadata(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        return {"freq_base": float(theta)}
    if rope_type == "linear":
        return {"freq_base": float(theta), "scaling": ("linear", float(rope["factor"]))}
    raise ValueError(f"RoPE type {rope_type!r} is not written to GGUF by yulan_tune (supported: default, linear)")


def write_gguf(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    *,
    dtype: str = "f16",
    name: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Write `model` (a plain Llama) and `tokenizer` to the GGUF file `path`; returns a summary (tensors, bytes,
    the tokenizer's pre-tokenizer name, the special ids)."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"write_gguf writes a LlamaForCausalLM, got {type(model).__name__}")
    config = model.config
    if getattr(config, "mlp_bias", False):
        raise ValueError("llama.cpp's llama architecture has no MLP biases; this model has mlp_bias=True")
    if config.hidden_act != "silu":
        raise ValueError(f"llama.cpp's llama architecture uses SiLU; this model has hidden_act={config.hidden_act!r}")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(tokenizer, vocab_size)
    rope = _rope_metadata(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["freq_base"])
    if "scaling" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["scaling"][1])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(_FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id),
                     ("eot", writer.add_eot_token_id)):
        if key in ids:
            add(ids[key])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    # tensor infos first, then the data one tensor at a time: a 2.4B model never sits in memory twice
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when there is no output tensor
    plan = []
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no llama.cpp tensor name for {hf_name!r} (not a plain Llama tensor)")
        plan.append((gguf_name, hf_name, tensor))
    infos = []
    for gguf_name, hf_name, tensor in plan:
        shape = tuple(tensor.shape)
        qtype = ggml_type(shape, dtype)
        nbytes = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        infos.append((gguf_name, hf_name, qtype))
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), int(np.prod(nbytes)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    written = 0
    for gguf_name, hf_name, qtype in progress(infos, desc=f"writing {path.name}", unit="tensor",
                                              enabled=show_progress):
        values = state[hf_name].detach().to(torch.float32).cpu().numpy()
        if ".attn_q." in gguf_name:
            values = permute_for_rope(values, heads)
        elif ".attn_k." in gguf_name:
            values = permute_for_rope(values, kv_heads)
        data = _encode(values, qtype)
        writer.write_tensor_data(data)
        written += data.nbytes
    writer.close()
    return {"path": str(path), "dtype": dtype, "tensors": len(infos), "bytes": path.stat().st_size,
            "tensor_bytes": written, "pre_tokenizer": vocab.pre, "special_ids": dict(ids),
            "chat_template": bool(vocab.chat_template)}
