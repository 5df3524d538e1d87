"""Held-out math exact-match: the quickstart's metric (greedy decoding, final integer answer)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.console import progress
from yulan_tune.data.chat import end_of_turn_ids, generation_prompt_ids
from yulan_tune.data.math_problems import MathProblem, extract_answer, math_messages


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[str]:
    """Greedy completions for each conversation, left-padded batches, stopped at the end-of-turn tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    completions: list[str] = []
    starts = range(0, len(conversations), batch_size)
    for start in progress(starts, desc="generating", unit="batch", enabled=show_progress, leave=False):
        prompts = [generation_prompt_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=pad_id,
        )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return completions


def math_correct(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathProblem],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[bool]:
    """For each problem, whether the extracted final answer equals the true answer."""
    answers = generate_answers(model, tokenizer, [math_messages(p) for p in problems], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, show_progress=show_progress)
    return [extract_answer(a) == p.answer for a, p in zip(answers, problems)]


def math_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[MathProblem],
                  **generation: Any) -> float:
    """Fraction of problems whose extracted final answer equals the true answer (`generation`: `math_correct`'s
    max_new_tokens, batch_size, show_progress)."""
    return sum(math_correct(model, tokenizer, problems, **generation)) / max(1, len(problems))
