"""Held-out math exact-match: the quickstart's metric (greedy decoding, final integer answer)."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.data.chat import end_of_turn_ids, generation_prompt_ids
from yulan_tune.data.math_problems import MathProblem, extract_answer, generate_problems

# The instruction the bundled SFT data pairs with each question (the same text at train and eval time).
MATH_INSTRUCTION = "Solve the problem and end with 'The answer is N.'"


def math_messages(problem: MathProblem) -> list[dict]:
    return [{"role": "user", "content": f"{problem.question}\n{MATH_INSTRUCTION}"}]


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions for each conversation, left-padded batches, stopped at the end-of-turn tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    completions: list[str] = []
    for start in range(0, len(conversations), batch_size):
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


def math_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathProblem],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> float:
    """Fraction of problems whose extracted final answer equals the true answer."""
    answers = generate_answers(
        model, tokenizer, [math_messages(p) for p in problems], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return sum(extract_answer(a) == p.answer for a, p in zip(answers, problems)) / max(1, len(problems))


def eval_main(argv: list[str] | None = None) -> int:
    from yulan_tune.loading import load_model, load_tokenizer

    parser = argparse.ArgumentParser(prog="yulan-tune eval", description="Held-out math exact-match accuracy.")
    parser.add_argument("--model", required=True, help="model dir or hub id")
    parser.add_argument("--adapter", default=None, help="optional LoRA adapter dir")
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.adapter or args.model) if args.adapter else load_tokenizer(args.model)
    model = load_model(args.model, adapter=args.adapter)
    problems = generate_problems(args.num_problems, args.seed, split="test")
    accuracy = math_accuracy(model, tokenizer, problems, max_new_tokens=args.max_new_tokens)
    print(f"eval: math exact-match={accuracy:.3f} n={len(problems)} model={args.model}")
    return 0
