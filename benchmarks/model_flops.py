"""Model FLOPs of a training run (YuLan-Mini's own formula and a GQA-exact one) and MFU against the GPU's dense bf16
peak."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, heads=heads, kv_heads=config.num_key_value_heads or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def reference_training_flops(shape: Shape, sequence_lengths: Sequence[int], reference_forwards: int = 0) -> float:
    """Training FLOPs of sequences of the given lengths, by the formula of YuLan-Mini's own MFU estimate
    (`pretrain/scripts/estimate_mfu.py`, huyiwen/YuLan-Mini@5a4c9cc; the script docs/yulan_reference.md 3.3 cites), per
    sequence of s tokens:

        E = 8 s l h^2 + 6 s l h f + 4 s^2 l h        (forward: attention projections, SwiGLU MLP, attention)
        F = 3 E + 4 s^2 l h + 6 s h V                (x3 forward + backward, attention recomputation, LM head)

    The script applies it to full 4096-token rows; here s is each attended span (a document of a packed row, the
    real tokens of a padded row), so padding and masked-off cross-document attention earn no FLOPs. DPO adds
    `reference_forwards` forward passes of a frozen reference model: E + 2 s h V each.
    8 s l h^2 counts K and V as h x h projections although with YuLan's GQA (6 KV heads of 30) they are 5x smaller,
    and the 4 s^2 l h recomputation term is work done twice: at 4096 tokens this formula credits 1.20x the FLOPs
    of `gqa_exact_training_flops`, and MFU by it reads 1.20x higher.
    """
    l, h, f, v = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    total = 0.0
    for s in sequence_lengths:
        forward = 8 * s * l * h**2 + 6 * s * l * h * f + 4 * s**2 * l * h
        total += 3 * forward + 4 * s**2 * l * h + 6 * s * h * v + reference_forwards * (forward + 2 * s * h * v)
    return total


def gqa_exact_training_flops(shape: Shape, sequence_lengths: Sequence[int], reference_forwards: int = 0) -> float:
    """The same accounting with the real projection sizes (q, o: h x heads*d; k, v: h x kv_heads*d) and without
    the recomputation term: 3 x forward matmul FLOPs + LM head, non-causal attention (the reference's convention)."""
    attention = 4 * shape.layers * shape.heads * shape.head_dim
    total = 0.0
    for s in sequence_lengths:
        total += (3 + reference_forwards) * (projection_flops(shape, s) + attention * s**2)
    return total


def projection_flops(shape: Shape, tokens: int) -> float:
    """Forward matmul FLOPs of `tokens` tokens through every projection (q and o of heads x head_dim, k and v of
    kv_heads x head_dim, the SwiGLU MLP) and the LM head: a forward pass without its attention scores."""
    l, h, f, v = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return tokens * (2 * l * h * (2 * q + 2 * kv) + 6 * l * h * f + 2 * h * v)


# Dense bf16 tensor-core peak FLOP/s (vendor datasheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    for needle, flops in PEAK_BF16_FLOPS:
        if needle in device_name:
            return flops
    return None


def add_mfu(result: dict[str, Any], shape: Shape, device_name: str, peak_flops: float | None = None,
            reference_forwards: int = 0) -> None:
    """Add model FLOPs per second and MFU (reference formula, and the GQA-exact one) to a run's `result`."""
    lengths = result["sequence_lengths"]
    peak = peak_flops or peak_bf16_flops(device_name)
    for key, fn in (("reference", reference_training_flops), ("gqa_exact", gqa_exact_training_flops)):
        flops = fn(shape, lengths, reference_forwards)
        result[f"flops_per_s_{key}"] = flops / result["wall_s"]
        result[f"mfu_{key}"] = flops / result["wall_s"] / peak if peak else None
    result["peak_flops"] = peak
