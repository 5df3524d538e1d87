"""muP learning-rate groups for the yulanmini form (docs/yulan_reference.md 3.2, report Table 3, fact 7.9).

Hidden matrices (q, k, v, o, gate, up, down, and an untied lm_head) train at lr / m_width with
m_width = hidden_size / dim_model_base_lr (7.5 for the 2.42B run); the embedding (= the tied lm_head), biases,
norm weights and WeSaR scalars train at the full lr. All groups use weight decay 0.1 in the reference; the decay of
norms, biases and scalars there is an accident of its grouping code, so it can be switched off here.

Each group records `lr_scale`, its lr as a fraction of the peak lr, so code that sets an absolute lr (annealing to a
new peak, a custom schedule) can keep the ratios: `group["lr"] = peak_lr * group["lr_scale"]`. LambdaLR-style
schedulers keep them by construction (they scale each group's initial lr).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM, YuLanMiniModel

# The reference's AdamW settings (3.1): betas, eps 1e-15, weight decay 0.1.
REFERENCE_BETAS = (0.9, 0.95)
REFERENCE_EPS = 1e-15
REFERENCE_WEIGHT_DECAY = 0.1
# Weight names trained at lr / m_width (the reference's hidden_weights_* groups, 3.2).
HIDDEN_MATRICES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")


def _yulanmini(model: nn.Module) -> YuLanMiniForCausalLM | YuLanMiniModel:
    if isinstance(model, (YuLanMiniForCausalLM, YuLanMiniModel)):
        return model
    wrapped = model.get_base_model() if hasattr(model, "get_base_model") else None  # a PEFT model
    if isinstance(wrapped, (YuLanMiniForCausalLM, YuLanMiniModel)):
        raise TypeError(
            f"muP parameter groups are for full-parameter training of a yulanmini model, but this "
            f"{type(model).__name__} wraps it with adapters. Train adapters with a plain optimizer, or pass the "
            f"model without adapters."
        )
    hint = (" Convert a Llama checkpoint first: yulan_tune.modeling.convert.from_llama (yulan-tune convert "
            "--to yulanmini IN OUT)." if "Llama" in type(wrapped or model).__name__ else "")
    raise TypeError(f"muP parameter groups need a YuLanMiniForCausalLM (the yulanmini training form), got "
                    f"{type(model).__name__}.{hint}")


def mup_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = REFERENCE_WEIGHT_DECAY,
    decay_vectors: bool = True,
) -> list[dict[str, Any]]:
    """AdamW parameter groups for a yulanmini model, muP-scaled as the reference (3.2).

    Groups (empty ones are left out; trainable parameters only, each exactly once):
      "matrices"  hidden matrices (and an untied lm_head)   lr / m_width, weight_decay
      "embedding" the embedding (also the tied lm_head)     lr,           weight_decay
      "vectors"   biases, norm weights, WeSaR scalars       lr,           weight_decay if decay_vectors else 0
    Every group carries "name", "lr_scale" and "param_names" (names as in the model's state dict).
    """
    yulanmini = _yulanmini(model)
    m_width = yulanmini.config.mup_width_multiplier
    tied = yulanmini.config.tie_word_embeddings
    specs = {
        "matrices": {"lr_scale": 1 / m_width, "weight_decay": weight_decay},
        "embedding": {"lr_scale": 1.0, "weight_decay": weight_decay},
        "vectors": {"lr_scale": 1.0, "weight_decay": weight_decay if decay_vectors else 0.0},
    }
    members: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in specs}
    for name, parameter in model.named_parameters():  # shared (tied) tensors are yielded once
        if not parameter.requires_grad:
            continue
        if name.endswith(HIDDEN_MATRICES) or (name.endswith("lm_head.weight") and not tied):
            members["matrices"].append((name, parameter))
        elif name.endswith("embed_tokens.weight"):
            members["embedding"].append((name, parameter))
        elif parameter.ndim <= 1:  # biases, norm weights, scalars
            members["vectors"].append((name, parameter))
        else:
            raise ValueError(f"muP grouping does not know the {tuple(parameter.shape)} parameter {name!r}; "
                             f"add it to HIDDEN_MATRICES or handle it explicitly")
    return [
        {"name": group, "params": [p for _, p in named], "param_names": [n for n, _ in named],
         "lr": lr * specs[group]["lr_scale"], **specs[group]}
        for group, named in members.items() if named
    ]


def mup_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = REFERENCE_WEIGHT_DECAY,
    decay_vectors: bool = True,
    betas: tuple[float, float] = REFERENCE_BETAS,
    eps: float = REFERENCE_EPS,
    **adamw_kwargs: Any,
) -> torch.optim.AdamW:
    """torch AdamW over `mup_param_groups` with the reference's betas (0.9, 0.95) and eps 1e-15 (3.1)."""
    groups = mup_param_groups(model, lr, weight_decay=weight_decay, decay_vectors=decay_vectors)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **adamw_kwargs)
