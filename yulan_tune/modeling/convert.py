"""Convert between the yulanmini training form and the plain Llama form YuLan-Mini is released in.

`to_llama` folds every yulanmini factor into the weights (docs/yulan_reference.md section 2, fact 7.15):

    embed_tokens   E * scale_emb                      lm_head   E * a_lm * dim_model_base_logits/hidden (untied copy)
    q/k/v weight   W * a                              q/k/v bias  b * a   (the reference script forgot the biases)
    o_proj         W_o * a_o * rho, zero bias         gate/up   W * a_gu        down  W_d * a_d * rho
    norms          g * a * ln_scale                   a non-standard softmax scale goes into q (RoPE is linear)

`from_llama` inverts it: the released Llama becomes a yulanmini model with the muP factors of its shape (scale_emb,
rho = 1.4/sqrt(L), alphas at their init values) and the same outputs, so continued pretraining and annealing can
start from a released model. Folding happens in float64 and is cast once to the target dtype.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM

# Tokenizer and template files copied next to converted weights, so the output directory is usable on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# The released YuLan-Mini is bf16, so tied lm_head/embedding agree only to bf16 rounding (~2e-3 relative).
DEFAULT_TIE_TOLERANCE = 1e-2


def load_for_conversion(model_or_dir: PreTrainedModel | str | Path, model_class: type[PreTrainedModel],
          dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, Path | None]:
    if isinstance(model_or_dir, PreTrainedModel):
        if not isinstance(model_or_dir, model_class):
            raise TypeError(f"expected a {model_class.__name__}, got {type(model_or_dir).__name__}")
        return model_or_dir, None
    path = Path(model_or_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a model directory written by save_pretrained")
    model_type = json.loads(config_file.read_text()).get("model_type")
    expected = model_class.config_class.model_type
    if model_type != expected:
        direction = "to_llama / --to llama" if model_type == "yulanmini" else "from_llama / --to yulanmini"
        raise ValueError(f"{config_file}: model_type is {model_type!r}, this conversion reads {expected!r} "
                         f"checkpoints; for a {model_type!r} checkpoint use {direction}")
    return model_class.from_pretrained(path, dtype=dtype), path


def _fold(tensor: torch.Tensor, *factors: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """tensor * product(factors): the scalar product in float64, one float64 multiply, one cast to `dtype`."""
    if tensor.is_meta:  # shape-only models (parameter counting)
        return torch.empty_like(tensor, dtype=dtype)
    scale = math.prod(float(f.detach().reshape(())) if torch.is_tensor(f) else float(f) for f in factors)
    return tensor.detach().to(torch.float64, copy=True).mul_(scale).to(dtype)


def llama_config_for(config: YuLanMiniConfig) -> LlamaConfig:
    """The Llama config of the released form (1.1): untied, q/k/v(/o) bias as the source, same shape and RoPE."""
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range, use_cache=config.use_cache, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
        rope_parameters=copy.deepcopy(config.rope_parameters), attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout, mlp_bias=False,
    )


def _build(model_class: type[PreTrainedModel], config, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A model holding exactly `state_dict`: parameters are created empty (no random init of billions of weights),
    buffers such as RoPE's inv_freq are computed normally."""
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    first = next(iter(state_dict.values()))
    model.config.dtype = first.dtype
    if not first.is_meta:
        model.to(first.device)  # the buffers were created on the CPU
    return model.eval()


def to_llama(model_or_dir: YuLanMiniForCausalLM | str | Path, out_dir: str | Path | None = None, *,
             dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """The released Llama form of a yulanmini model (section 2); saved with tokenizer files when `out_dir` is given.

    `dtype` defaults to the source's. Raises ValueError for a QK-LayerNorm model (a Llama cannot hold it, 1.7).
    """
    model, source_dir = load_for_conversion(model_or_dir, YuLanMiniForCausalLM)
    cfg = model.config
    if cfg.qk_layernorm:
        raise ValueError("this yulanmini model uses QK-LayerNorm (qk_layernorm=True), which the Llama architecture "
                         "cannot express (docs/yulan_reference.md 1.7); it has no exact Llama conversion")
    dtype = dtype or model.dtype
    rho, ln_scale = cfg.residual_scale, cfg.ln_scale
    query_scale = cfg.attention_scale * math.sqrt(cfg.head_dim)  # ours / Llama's head_dim**-0.5; 1 for the real run
    embed = model.model.embed_tokens.weight
    state = {
        "model.embed_tokens.weight": _fold(embed, cfg.scale_emb, dtype=dtype),
        "lm_head.weight": _fold(model.lm_head.weight, model.lm_head_alpha, cfg.logits_scale, dtype=dtype),
        "model.norm.weight": _fold(model.model.norm.weight, model.model.norm_alpha, ln_scale, dtype=dtype),
    }
    for i, layer in enumerate(model.model.layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
        factors = {"q_proj": (attn.q_proj_alpha, query_scale), "k_proj": (attn.k_proj_alpha,),
                   "v_proj": (attn.v_proj_alpha,)}
        for name, scale in factors.items():
            projection = getattr(attn, name)
            state[f"{prefix}self_attn.{name}.weight"] = _fold(projection.weight, *scale, dtype=dtype)
            if projection.bias is not None:  # q = a (W x + b): the bias is scaled too
                state[f"{prefix}self_attn.{name}.bias"] = _fold(projection.bias, *scale, dtype=dtype)
        state[f"{prefix}self_attn.o_proj.weight"] = _fold(attn.o_proj.weight, attn.o_proj_alpha, rho, dtype=dtype)
        if cfg.attention_bias:  # Llama's attention_bias also creates an o_proj bias; yulanmini has none (1.1)
            state[f"{prefix}self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size, dtype=dtype,
                                                                  device=attn.o_proj.weight.device)
        state[f"{prefix}mlp.gate_proj.weight"] = _fold(mlp.gate_proj.weight, layer.gate_up_proj_alpha, dtype=dtype)
        state[f"{prefix}mlp.up_proj.weight"] = _fold(mlp.up_proj.weight, layer.gate_up_proj_alpha, dtype=dtype)
        state[f"{prefix}mlp.down_proj.weight"] = _fold(mlp.down_proj.weight, layer.down_proj_alpha, rho, dtype=dtype)
        state[f"{prefix}input_layernorm.weight"] = _fold(layer.input_layernorm.weight, layer.input_layernorm_alpha,
                                                         ln_scale, dtype=dtype)
        state[f"{prefix}post_attention_layernorm.weight"] = _fold(
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm_alpha, ln_scale, dtype=dtype)

    llama = _build(LlamaForCausalLM, llama_config_for(cfg), state)
    llama.generation_config = copy.deepcopy(model.generation_config)
    if out_dir is not None:
        save_converted(llama, out_dir, source_dir)
    return llama


def from_llama(
    model_or_dir: LlamaForCausalLM | str | Path,
    out_dir: str | Path | None = None,
    *,
    scale_emb: float = 10.0,
    dim_model_base_lr: int = 256,
    residual_multiplier: float = 1.4,
    tie_word_embeddings: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> YuLanMiniForCausalLM:
    """A yulanmini model with the same outputs as a Llama checkpoint (the inverse of `to_llama`).

    The yulanmini factors are those of the 2.42B recipe at the Llama's shape (`YuLanMiniConfig.for_shape`: embedding
    x`scale_emb`, rho = residual_multiplier/sqrt(L), alphas from `dim_model_base_lr`); each is divided out of the
    weights, so muP learning-rate groups and WeSaR scalars behave as in pretraining. The lm_head stays untied unless
    `tie_word_embeddings`, which requires lm_head to be proportional to embed_tokens (true for a model converted from
    the tied training form, up to `tie_tolerance` relative error); the ratio becomes lm_head_alpha.
    """
    llama, source_dir = load_for_conversion(model_or_dir, LlamaForCausalLM)
    lc = llama.config
    if lc.mlp_bias or lc.hidden_act != "silu":
        raise ValueError(f"yulanmini has a bias-free SwiGLU MLP; this Llama has mlp_bias={lc.mlp_bias}, "
                         f"hidden_act={lc.hidden_act!r}")
    layers = llama.model.layers
    if lc.attention_bias:
        largest = max(layer.self_attn.o_proj.bias.detach().abs().max().item() for layer in layers)
        if largest != 0:
            raise ValueError(f"yulanmini's o_proj has no bias, but this Llama's o_proj biases are non-zero (max |b| = "
                             f"{largest:.3g}); it cannot be converted without changing its outputs")
    cfg = YuLanMiniConfig.for_shape(**{
        "hidden_size": lc.hidden_size, "num_hidden_layers": lc.num_hidden_layers,
        "dim_model_base_lr": dim_model_base_lr, "residual_multiplier": residual_multiplier,
        "vocab_size": lc.vocab_size, "intermediate_size": lc.intermediate_size,
        "num_attention_heads": lc.num_attention_heads, "num_key_value_heads": lc.num_key_value_heads,
        "head_dim": lc.head_dim, "dim_model_base_attn": lc.head_dim,  # softmax scale 1/sqrt(head_dim), as Llama
        "max_position_embeddings": lc.max_position_embeddings, "rms_norm_eps": lc.rms_norm_eps,
        "rope_parameters": copy.deepcopy(lc.rope_parameters), "attention_bias": lc.attention_bias,
        "attention_dropout": lc.attention_dropout, "pad_token_id": lc.pad_token_id, "bos_token_id": lc.bos_token_id,
        "eos_token_id": lc.eos_token_id, "scale_emb": scale_emb, "tie_word_embeddings": tie_word_embeddings,
        **config_overrides,
    })
    if cfg.qk_layernorm:
        raise ValueError("qk_layernorm=True has no Llama counterpart to convert from (docs/yulan_reference.md 1.7)")
    dtype = dtype or llama.dtype
    rho, ln_scale = cfg.residual_scale, cfg.ln_scale
    query_scale = cfg.attention_scale * math.sqrt(cfg.head_dim)
    embed, lm_head = llama.model.embed_tokens.weight, llama.lm_head.weight

    state = {
        "model.embed_tokens.weight": _fold(embed, 1 / scale_emb, dtype=dtype),
        "model.norm.weight": _fold(llama.model.norm.weight, 1 / (cfg.norm_alpha * ln_scale), dtype=dtype),
        "model.norm_alpha": torch.tensor(cfg.norm_alpha, dtype=dtype),
    }
    if tie_word_embeddings:
        ratio = _tied_ratio(embed, lm_head, tie_tolerance)  # lm_head ~= ratio * embed
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        state["lm_head_alpha"] = torch.tensor(ratio * scale_emb / cfg.logits_scale, dtype=dtype)
    else:
        state["lm_head.weight"] = _fold(lm_head, 1 / (cfg.lm_head_alpha * cfg.logits_scale), dtype=dtype)
        state["lm_head_alpha"] = torch.tensor(cfg.lm_head_alpha, dtype=dtype)
    for i, layer in enumerate(layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
        divisors = {"q_proj": cfg.q_proj_alpha * query_scale, "k_proj": cfg.k_proj_alpha,
                    "v_proj": cfg.v_proj_alpha}
        for name, divisor in divisors.items():
            projection = getattr(attn, name)
            state[f"{prefix}self_attn.{name}.weight"] = _fold(projection.weight, 1 / divisor, dtype=dtype)
            if projection.bias is not None:
                state[f"{prefix}self_attn.{name}.bias"] = _fold(projection.bias, 1 / divisor, dtype=dtype)
            state[f"{prefix}self_attn.{name}_alpha"] = torch.tensor([getattr(cfg, f"{name}_alpha")], dtype=dtype)
        state[f"{prefix}self_attn.o_proj.weight"] = _fold(attn.o_proj.weight, 1 / (cfg.o_proj_alpha * rho),
                                                          dtype=dtype)
        state[f"{prefix}self_attn.o_proj_alpha"] = torch.tensor([cfg.o_proj_alpha], dtype=dtype)
        state[f"{prefix}mlp.gate_proj.weight"] = _fold(mlp.gate_proj.weight, 1 / cfg.gate_up_proj_alpha, dtype=dtype)
        state[f"{prefix}mlp.up_proj.weight"] = _fold(mlp.up_proj.weight, 1 / cfg.gate_up_proj_alpha, dtype=dtype)
        state[f"{prefix}mlp.down_proj.weight"] = _fold(mlp.down_proj.weight, 1 / (cfg.down_proj_alpha * rho),
                                                       dtype=dtype)
        for name in ("input_layernorm", "post_attention_layernorm"):
            alpha = getattr(cfg, f"{name}_alpha")
            state[f"{prefix}{name}.weight"] = _fold(getattr(layer, name).weight, 1 / (alpha * ln_scale), dtype=dtype)
            state[f"{prefix}{name}_alpha"] = torch.tensor(alpha, dtype=dtype)
        state[f"{prefix}gate_up_proj_alpha"] = torch.tensor(cfg.gate_up_proj_alpha, dtype=dtype)
        state[f"{prefix}down_proj_alpha"] = torch.tensor(cfg.down_proj_alpha, dtype=dtype)

    model = _build(YuLanMiniForCausalLM, cfg, state)
    model.generation_config = copy.deepcopy(llama.generation_config)
    if out_dir is not None:
        save_converted(model, out_dir, source_dir)
    return model


def _tied_ratio(embed: torch.Tensor, lm_head: torch.Tensor, tolerance: float) -> float:
    embed, lm_head = embed.detach().double(), lm_head.detach().double()
    ratio = float((lm_head * embed).sum() / (embed * embed).sum())
    residual = float((lm_head - ratio * embed).norm() / lm_head.norm())
    if residual > tolerance:
        raise ValueError(f"tie_word_embeddings=True needs lm_head = c * embed_tokens, but the best c={ratio:.4g} "
                         f"leaves a relative residual of {residual:.3g} > tie_tolerance={tolerance:g}: this head was trained "
                         f"untied; convert with tie_word_embeddings=False")
    return ratio


def save_converted(model: PreTrainedModel, out_dir: str | Path, source_dir: Path | None) -> None:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out_dir / name)


@torch.no_grad()
def max_logit_difference(model_a: PreTrainedModel, model_b: PreTrainedModel, num_tokens: int = 64,
                         seed: int = 0) -> tuple[float, float]:
    """(max |logits_a - logits_b|, max |logits_a|) on random token ids: a check that a conversion kept outputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model_a.config.vocab_size, (1, num_tokens), generator=generator)
    logits_a = model_a(input_ids.to(model_a.device)).logits.float().cpu()
    logits_b = model_b(input_ids.to(model_b.device)).logits.float().cpu()
    return (logits_a - logits_b).abs().max().item(), logits_a.abs().max().item()
