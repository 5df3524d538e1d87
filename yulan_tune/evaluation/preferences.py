"""Held-out preference metrics: how a policy scores chosen against rejected responses, relative to a reference."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from yulan_tune.data.preferences import TokenizedPreferences


@torch.no_grad()
def completion_logps(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean, `average=True`) of log p(completion token | everything before it), one value per row.

    Runs the model in whatever train/eval mode it is in (a 4-bit model on CPU must not see an eval-mode forward
    before training: docs/stack_notes.md, bitsandbytes trap 1).
    """
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + c for p, c in zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size])]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, prompt) in enumerate(zip(rows, prompt_ids[start:start + batch_size])):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            completion[i, len(prompt): len(row)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logps = log_probs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        scored = completion[:, 1:].to(device)
        sums = (token_logps * scored).sum(-1)
        values.append((sums / scored.sum(-1).clamp(min=1)) if average else sums)
    return torch.cat(values).cpu()


def pair_logps(model: PreTrainedModel, pairs: TokenizedPreferences, pad_token_id: int, *, eval_mode: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, with dropout off (`eval_mode`) unless the caller must keep the
    model in train mode (a 4-bit model on CPU before training: docs/stack_notes.md, bitsandbytes trap 1)."""
    prompts = pairs.columns["prompt_ids"]
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        return (completion_logps(model, prompts, pairs.columns["chosen_ids"], pad_token_id=pad_token_id),
                completion_logps(model, prompts, pairs.columns["rejected_ids"], pad_token_id=pad_token_id))
    finally:
        model.train(was_training)


def preference_metrics(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Held-out preference metrics from summed response log-probs (chosen, rejected) of the policy and reference.

    reward_accuracy: share of pairs whose DPO implicit reward, beta * log(pi / pi_ref) (Rafailov et al. 2023, eq. 5),
    is higher for chosen than for rejected; beta > 0 only scales it. Ties count 1/2, so the reference model itself
    scores exactly 0.5. logratio_margin: the mean of log(pi / pi_ref)(chosen) - log(pi / pi_ref)(rejected), in nats.
    logp_accuracy: share of pairs where the policy alone gives chosen the higher log-probability.
    """
    (chosen, rejected), (ref_chosen, ref_rejected) = policy, reference
    margins = (chosen - ref_chosen) - (rejected - ref_rejected)
    return {
        "reward_accuracy": ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item(),
        "logratio_margin": margins.mean().item(),
        "logp_accuracy": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item(),
        "chosen_logp": chosen.mean().item(),
        "rejected_logp": rejected.mean().item(),
    }
