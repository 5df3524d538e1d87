"""A loss for long rows: the yulanmini causal-LM loss computed a chunk of tokens at a time."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from yulan_tune.conventions import IGNORE_INDEX
from yulan_tune.modeling.yulanmini import causal_lm_loss_with_z_loss


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    logits_multiplier: torch.Tensor | float,
    labels: torch.Tensor,
    z_loss: float,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The yulanmini loss (mean CE + z_loss * logsumexp^2, docs/yulan_reference.md 1.3.5) computed `chunk_size` tokens at a
    time: logits = (h * multiplier) @ W^T of one chunk exist only inside a checkpointed function, so the forward keeps
    no [tokens, vocab] tensor and backward recomputes one chunk at a time. Equal to the model's own loss."""
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()

    def chunk_loss_sum(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(h * logits_multiplier, lm_head_weight)
        # num_items_in_batch=1 turns the model's loss function into a sum over the chunk's predicted tokens
        return causal_lm_loss_with_z_loss(logits, None, z_loss, num_items_in_batch=1, shift_labels=targets)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        targets = shift_labels[start:start + chunk_size]
        if bool((targets != IGNORE_INDEX).any()):
            total = total + checkpoint(chunk_loss_sum, hidden[start:start + chunk_size], targets, use_reentrant=False)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
