"""YuLan-Mini's training architecture, "yulanmini": a Llama with muP-style scaling and WeSaR scalars.

The released YuLan-Mini is a plain Llama; it was trained in this form and converted by folding the factors below into
the weights (`yulan_tune.modeling.convert`). Pretraining and annealing run in this form. Every factor cites
`docs/yulan_reference.md` (section numbers in parentheses):

    h0 = E[ids] * scale_emb                                               (1.3.1)
    per layer, rho = hidden_states_shrink = 1.4 / sqrt(L):                (1.3.3, 1.4)
        x = RMSNorm_in(h) * ln_scale * a_in
        q, k, v = a_q (W_q x + b_q), a_k (W_k x + b_k), a_v (W_v x + b_v)  (then RoPE)
        attn = softmax(q k^T * sqrt(dim_model_base_attn) / head_dim) v
        h = h + rho * a_o W_o attn
        y = RMSNorm_post(h) * ln_scale * a_post * a_gu
        h = h + rho * a_d W_down(silu(W_gate y) * W_up y)
    logits = (RMSNorm_final(h) * ln_scale * a_norm) * (dim_model_base_logits / hidden) * a_lm  @ E^T   (1.3.4-5)
    loss = mean CE + z_loss * mean(logsumexp(logits)^2) over non-ignored tokens                       (1.3.5)

The a_* are learnable scalars (WeSaR, 1.6) whose initial values carry the muP init factors, while every matrix starts
at N(0, 5e-5^2) (1.5). Parameter names equal the reference's, so its checkpoints load as they are (1.6).

Where the scalars are applied is a speed choice, not the math: each a_* (with rho on the residual branches) multiplies
the weight it follows (`ScaledLinear`, the RMSNorm weight) instead of the activation it produces, a weight-sized
product instead of an activation-sized one that would also be kept for backward. Same values and gradients up to
float rounding (tests/test_yulanmini.py); on the tiny shape it took the CPU step from 1.20x to 1.035x a plain
Llama's (benchmarks/RESULTS.md).

Deliberate differences from the reference code: the model always returns logits (the reference returns none); the
embedding scale also applies to `inputs_embeds` (so that `model(inputs_embeds=embed(ids)) == model(ids)`); RoPE
positions follow `position_ids` (see `YuLanMiniModel.forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from yulan_tune.conventions import IGNORE_INDEX

# The 2.42B run (1.2): m_width = hidden / dim_model_base_lr = 1920 / 256 = 7.5, L = 56.
_RUN_M_WIDTH, _RUN_LAYERS = 1920 / 256, 56


def mup_alphas(hidden_size: int, num_hidden_layers: int, dim_model_base_lr: int) -> dict[str, float]:
    """Initial WeSaR scalars for a width/depth (1.4 table, 1.2): q/k/v/gate_up 1/sqrt(m), o/down 1/sqrt(2 m L)."""
    m_width = hidden_size / dim_model_base_lr
    input_alpha, output_alpha = m_width**-0.5, (2 * m_width * num_hidden_layers) ** -0.5
    return {
        "q_proj_alpha": input_alpha,
        "k_proj_alpha": input_alpha,
        "v_proj_alpha": input_alpha,
        "gate_up_proj_alpha": input_alpha,
        "o_proj_alpha": output_alpha,
        "down_proj_alpha": output_alpha,
    }


class YuLanMiniConfig(PreTrainedConfig):
    """Config of the yulanmini form. Field names are the reference's (`configuration_yulanmini.py`) so its config.json
    files load; defaults are the 2.42B run (docs/yulan_reference.md 1.2). Use `for_shape` for another width or depth."""

    model_type = "yulanmini"

    # shape (1.1)
    vocab_size: int = 99000
    hidden_size: int = 1920
    intermediate_size: int = 4800
    num_hidden_layers: int = 56
    num_attention_heads: int = 30
    num_key_value_heads: int | None = 6
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters | dict | None = None  # rope_theta 10000 in the 4K stage (1.1)
    attention_bias: bool = True  # q/k/v only; o_proj never has a bias (1.8)
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    # muP-style multipliers (1.2, 1.4); None means "as wide as the model", i.e. no scaling, as in the reference
    scale_emb: float = 10.0
    hidden_states_shrink: float | str = 1.4 / math.sqrt(_RUN_LAYERS)  # "muparam" means 1/sqrt(L) (reference)
    dim_model_base: int | None = None
    dim_model_base_attn: int | None = None
    dim_model_base_lmh: int | None = None
    dim_model_base_logits: int | None = None
    dim_model_base_lr: int | None = 256
    dim_model_base_init: int | None = None
    # initialization (1.5)
    initializer_range: float = 5e-5
    init_scale_o: float = 1.0
    model_reproduce: str = "cerebras"
    # WeSaR scalars (1.6): initial values; the learned values live in the state dict
    wesar_weights: bool = True
    use_norm_alpha: bool = True
    # the reference's embedding scalar is the constant 1 whatever these two say (1.3.1, 1.6); kept for loading
    use_emb_alpha: bool = False
    embed_tokens_alpha: float = 1.0
    q_proj_alpha: float = _RUN_M_WIDTH**-0.5
    k_proj_alpha: float = _RUN_M_WIDTH**-0.5
    v_proj_alpha: float = _RUN_M_WIDTH**-0.5
    gate_up_proj_alpha: float = _RUN_M_WIDTH**-0.5
    o_proj_alpha: float = (2 * _RUN_M_WIDTH * _RUN_LAYERS) ** -0.5
    down_proj_alpha: float = (2 * _RUN_M_WIDTH * _RUN_LAYERS) ** -0.5
    input_layernorm_alpha: float = 1.0
    post_attention_layernorm_alpha: float = 1.0
    norm_alpha: float = 1.0
    lm_head_alpha: float = 1.0
    # loss (1.3.5) and stability options (3.8)
    z_loss: float = 1e-4
    shrink_alpha: float = 1.0
    qk_layernorm: bool = False
    layer_norm_eps: float = 1e-6
    ln_scale: float = 1.0
    embedding_ln: bool = False
    embedding_rmsln: bool = False
    rms_type: str = "llama"
    use_sliding_window: bool = False
    sliding_window: int | None = None
    use_liger: bool = False  # kernels only; same math and parameter names (1.2)
    # activation checkpointing: layer i is recomputed iff i % step != 0 (1.8); None recomputes every layer
    gradient_checkpointing_step: int | None = None
    # curriculum bookkeeping written by the reference trainer (3.5)
    num_steps_trained_before_this_epoch: int = 0
    num_epochs_trained_before_this_epoch: int = 0

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_states_shrink == "muparam":
            self.hidden_states_shrink = 1 / math.sqrt(self.num_hidden_layers)
        # the reference resolves its None defaults the same way (configuration_yulanmini.py)
        self.dim_model_base = self.dim_model_base or self.hidden_size
        self.dim_model_base_attn = self.dim_model_base_attn or self.head_dim
        self.dim_model_base_lmh = self.dim_model_base_lmh or 1
        self.dim_model_base_logits = self.dim_model_base_logits or self.hidden_size
        self.dim_model_base_lr = self.dim_model_base_lr or self.hidden_size
        if not self.use_sliding_window:
            self.sliding_window = None  # a saved window size must not turn the KV cache into a sliding one
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def for_shape(
        cls, *, hidden_size: int, num_hidden_layers: int, dim_model_base_lr: int, residual_multiplier: float = 1.4,
        **kwargs,
    ) -> YuLanMiniConfig:
        """A config whose muP factors follow its own width and depth: alphas from `mup_alphas` and
        hidden_states_shrink = residual_multiplier / sqrt(L) (1.2, 1.4). Other fields pass through `kwargs`."""
        derived = mup_alphas(hidden_size, num_hidden_layers, dim_model_base_lr)
        derived["hidden_states_shrink"] = residual_multiplier / math.sqrt(num_hidden_layers)
        return cls(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, dim_model_base_lr=dim_model_base_lr,
                   **{**derived, **kwargs})

    @property
    def residual_scale(self) -> float:
        """rho applied to each residual branch; the reference applies it only when 0 <= rho < 1 (1.3.3)."""
        return float(self.hidden_states_shrink) if 0 <= float(self.hidden_states_shrink) < 1 else 1.0

    @property
    def attention_scale(self) -> float:
        return math.sqrt(self.dim_model_base_attn) / self.head_dim  # 1/8 for the real run (1.3.3, 7.5)

    @property
    def logits_scale(self) -> float:
        return self.dim_model_base_logits / self.hidden_size  # 1 for the real run (1.3.5, 1.4)

    @property
    def mup_width_multiplier(self) -> float:
        return self.hidden_size / self.dim_model_base_lr  # m_width = 7.5 for the real run (1.4, 3.2)


def _scalar(value: float, shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float(value)))


class ScaledLinear(nn.Linear):
    """`nn.Linear` whose output is multiplied by `scale`, computed as `x @ (scale W)^T + scale b`. Still called as a
    module, so forward hooks and ZeRO-3 parameter gathering see it; without `scale` it is a plain `nn.Linear`."""

    def forward(self, input: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        if scale is None or (isinstance(scale, float) and scale == 1.0):
            return super().forward(input)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(self.weight.dtype)  # a [1]-shaped fp32 scalar would otherwise promote a bf16 weight
        return F.linear(input, self.weight * scale, None if self.bias is None else self.bias * scale)


class YuLanMiniRMSNorm(nn.Module):
    """RMSNorm with the reference's "llama" casting: normalize and scale in fp32, then cast back (1.3.3). A `scale`
    multiplies the weight (in fp32), which is the output multiplied by it."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        weight = self.weight.float() if scale is None else self.weight.float() * scale
        return (x * weight).to(hidden_states.dtype)


class PerHeadLayerNorm(nn.Module):
    """QK-LayerNorm ablation (1.7): one bias-free LayerNorm per head; `norms.{h}` keeps the reference's key names."""

    def __init__(self, head_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads))

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [batch, heads, seq, head_dim]
        return torch.cat([norm(head) for norm, head in zip(self.norms, states.split(1, dim=1))], dim=1)


class YuLanMiniAttention(nn.Module):
    def __init__(self, config: YuLanMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.attention_scale  # sqrt(dim_model_base_attn) / head_dim (1.3.3)
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ScaledLinear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = ScaledLinear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = ScaledLinear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = ScaledLinear(q_size, config.hidden_size, bias=False)
        self.o_proj.mup_init_role = "residual_output"  # read by _init_weights (1.5)
        if config.wesar_weights:  # shape [1] on the attention module, as the reference (1.6)
            for name in ("q_proj_alpha", "k_proj_alpha", "v_proj_alpha", "o_proj_alpha"):
                setattr(self, name, _scalar(getattr(config, name), (1,)))
        else:
            self.q_proj_alpha = self.k_proj_alpha = self.v_proj_alpha = self.o_proj_alpha = 1.0
        if config.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(self.head_dim, config.num_attention_heads, config.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(self.head_dim, config.num_key_value_heads, config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states, self.q_proj_alpha).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states, self.k_proj_alpha).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, self.v_proj_alpha).view(hidden_shape).transpose(1, 2)
        if self.config.qk_layernorm:  # after the scalars, before RoPE (1.7)
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        # the residual-branch factor rho is applied here too: the output is the residual update rho * a_o W_o attn
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous(),
                                  self.o_proj_alpha * self.config.residual_scale)
        return attn_output, attn_weights


class YuLanMiniMLP(nn.Module):
    def __init__(self, config: YuLanMiniConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = ScaledLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.mup_init_role = "residual_output"  # read by _init_weights (1.5)

    def forward(self, x: torch.Tensor, down_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), down_scale)


class YuLanMiniDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: YuLanMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.self_attn = YuLanMiniAttention(config, layer_idx)
        self.mlp = YuLanMiniMLP(config)
        self.input_layernorm = YuLanMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = YuLanMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        # 0-dim scalars on the layer, as the reference (1.6)
        self.gate_up_proj_alpha = _scalar(config.gate_up_proj_alpha, ()) if config.wesar_weights else 1.0
        self.down_proj_alpha = _scalar(config.down_proj_alpha, ()) if config.wesar_weights else 1.0
        use_norm_alpha = config.wesar_weights and config.use_norm_alpha
        self.input_layernorm_alpha = _scalar(config.input_layernorm_alpha, ()) if use_norm_alpha else 1.0
        self.post_attention_layernorm_alpha = (
            _scalar(config.post_attention_layernorm_alpha, ()) if use_norm_alpha else 1.0
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        rho, ln_scale = self.config.residual_scale, self.config.ln_scale  # (1.3.3)
        x = self.input_layernorm(hidden_states, ln_scale * self.input_layernorm_alpha)
        attn_output, _ = self.self_attn(x, position_embeddings, attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output  # already rho * a_o W_o attn

        # y = RMSNorm_post(h) * ln_scale * a_post * a_gu: both scalars ride on the norm weight
        y = self.post_attention_layernorm(
            hidden_states, ln_scale * self.post_attention_layernorm_alpha * self.gate_up_proj_alpha)
        return hidden_states + self.mlp(y, self.down_proj_alpha * rho)


class YuLanMiniPreTrainedModel(PreTrainedModel):
    config_class = YuLanMiniConfig  # explicit: `from __future__ import annotations` hides the annotation's class
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["YuLanMiniDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": YuLanMiniDecoderLayer, "attentions": YuLanMiniAttention}

    def _linear_init_std(self, module: nn.Linear) -> float:
        """Std of a Linear weight (1.5, `_init_weights` of the reference). The real run ("cerebras", init_scale_o 1,
        no dim_model_base_init) gives initializer_range everywhere: the muP factors live in the alphas instead."""
        cfg, std = self.config, self.config.initializer_range
        if cfg.model_reproduce == "transformer":
            return std
        role, base_init = getattr(module, "mup_init_role", "input"), cfg.dim_model_base_init
        if role == "residual_output":  # o_proj, down_proj
            std /= cfg.init_scale_o
            if base_init is not None:
                width = cfg.hidden_size / base_init
                std /= math.sqrt(2 * width * cfg.num_hidden_layers if cfg.model_reproduce == "cerebras" else width)
        elif role == "lm_head":  # only when untied
            std /= math.sqrt(cfg.dim_model_base_lmh)
        elif base_init is not None:  # q, k, v, gate, up
            std /= math.sqrt(cfg.hidden_size / base_init)
        return std

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization skips tensors loaded from a checkpoint, so this only fills missing ones
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self._linear_init_std(module))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # tied: N(0, initializer_range^2) like every matrix; untied: std 1 (1.5)
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range if
                         self.config.tie_word_embeddings else 1.0)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        else:
            super()._init_weights(module)  # norms to 1, rotary inv_freq
        # WeSaR scalars carry the muP init factors; each is named after its config field (1.2, 1.6)
        for name, parameter in module.named_parameters(recurse=False):
            if name.endswith("_alpha"):
                init.constant_(parameter, float(getattr(self.config, name)))

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        step = self.config.gradient_checkpointing_step
        if enable and every_n_layers == 1 and step is not None and step > 1:
            # the reference keeps the activations of every step-th layer and recomputes the others (1.8)
            for module in self.modules():
                if isinstance(module, YuLanMiniDecoderLayer):
                    module.gradient_checkpointing = module.layer_idx % step != 0


def _check_supported(config: YuLanMiniConfig) -> None:
    unsupported = {
        "embedding_ln": config.embedding_ln,
        "embedding_rmsln": config.embedding_rmsln,
        "use_sliding_window": config.use_sliding_window,
        "rms_type": config.rms_type != "llama",
    }
    if config.hidden_act != "silu":
        raise ValueError(f"yulanmini's MLP is SwiGLU (hidden_act 'silu'), got hidden_act={config.hidden_act!r}")
    enabled = [name for name, on in unsupported.items() if on]
    if enabled:
        raise NotImplementedError(
            f"yulanmini options {enabled} are reference ablations that the 2.42B run did not use and yulan_tune does "
            f"not implement (docs/yulan_reference.md 1.8, 3.8); set them to their defaults (False, rms_type='llama')"
        )


class YuLanMiniModel(YuLanMiniPreTrainedModel):
    def __init__(self, config: YuLanMiniConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(YuLanMiniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = YuLanMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        use_norm_alpha = config.wesar_weights and config.use_norm_alpha
        self.norm_alpha = _scalar(config.norm_alpha, ()) if use_norm_alpha else 1.0
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds * self.config.scale_emb  # (1.3.1)
        if 0 <= self.config.shrink_alpha < 1:  # embedding-gradient shrink, off in the real run (1.3.1)
            a = self.config.shrink_alpha
            hidden_states = hidden_states * a + hidden_states.detach() * (1 - a)

        # RoPE positions: the reference ran RoPE over 0..L-1 of the packed row and used position_ids only to mask
        # documents apart (1.3.6, 7.17). We rotate by `position_ids`, which restart per document in transformers/trl
        # packing, as the converted Llama does. With per-document masking the two agree: RoPE scores depend only on
        # q-k distance, which is the same in both. Rows without position_ids get 0..L-1 and full causal attention,
        # exactly the reference's behaviour without document masking.
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden_states.shape[1], device=hidden_states.device)
                            + past_seen_tokens).unsqueeze(0)
        # The mask is built before a fresh cache is created: with no cache and no 2D mask, transformers detects
        # packed rows from position_ids and masks documents apart (also in eval with use_cache=True).
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask,
                                          position_embeddings=position_embeddings, position_ids=position_ids,
                                          cache=cache, use_cache=use_cache, **kwargs)

        hidden_states = self.norm(hidden_states) * (self.config.ln_scale * self.norm_alpha)  # (1.3.4)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def causal_lm_loss_with_z_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    z_loss: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over predicted tokens of CE + z_loss * logsumexp(logits)^2 (1.3.5; Liger's `lse_square_scale`).

    Labels are shifted inside, as transformers' ForCausalLMLoss (or pass `shift_labels`, already shifted). With
    `num_items_in_batch` (the Trainer passes the count of predicted tokens over all accumulated micro-batches) the sum
    is divided by it instead of by this batch's count, so gradient accumulation gives the same loss as one big batch.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = shift_labels.reshape(-1).to(logits.device)
    keep = targets != ignore_index
    logsumexp = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = (logsumexp - target_logits) + z_loss * logsumexp.square()
    total = torch.where(keep, per_token, 0.0).sum()  # ignored positions may hold any value, even inf
    if num_items_in_batch is None:
        return total / keep.sum()  # nan when nothing is predicted, as cross_entropy's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class YuLanMiniForCausalLM(YuLanMiniPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # used when config.tie_word_embeddings

    def __init__(self, config: YuLanMiniConfig) -> None:
        super().__init__(config)
        self.model = YuLanMiniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.mup_init_role = "lm_head"
        self.lm_head_alpha = _scalar(config.lm_head_alpha, ()) if config.wesar_weights else 1.0
        self.post_init()
        if config.tie_word_embeddings:
            # the tied head is the embedding: never saved, and re-tied (not reported missing) when Trainer resumes
            self._keys_to_ignore_on_save.add("lm_head.weight")

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`labels` are input ids with IGNORE_INDEX where no loss is wanted (shifted inside); the loss adds z-loss (1.3.5)."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # logits = (h * dim_model_base_logits / hidden * a_lm) @ W_lm^T, W_lm = E when tied (1.3.5)
        logits = self.lm_head(hidden_states * (self.config.logits_scale * self.lm_head_alpha))

        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss_with_z_loss(logits, labels, self.config.z_loss, num_items_in_batch,
                                              shift_labels=shift_labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# Registered on import (yulan_tune/__init__.py imports this module), so AutoModelForCausalLM.from_pretrained loads
# yulanmini checkpoints, the reference's included, without trust_remote_code.
AutoConfig.register(YuLanMiniConfig.model_type, YuLanMiniConfig, exist_ok=True)
AutoModel.register(YuLanMiniConfig, YuLanMiniModel, exist_ok=True)
AutoModelForCausalLM.register(YuLanMiniConfig, YuLanMiniForCausalLM, exist_ok=True)

__all__ = [
    "YuLanMiniConfig",
    "YuLanMiniForCausalLM",
    "YuLanMiniModel",
    "YuLanMiniPreTrainedModel",
    "causal_lm_loss_with_z_loss",
    "mup_alphas",
]
