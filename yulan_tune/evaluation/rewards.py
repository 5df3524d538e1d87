"""Reward terms for RL (`GRPORecipe`) and the labels of on-policy preference pairs (`yulan-tune pairs`).

Each term is a callable with trl's reward-function signature, `term(prompts, completions, completion_ids=None,
**columns) -> list[float | None]`: `completions` are strings or assistant turns (`[{"role": "assistant", "content":
...}]`), `columns` are the dataset's other columns, one value per completion. `None` means "this term does not apply
to this row" (trl averages the terms that apply). The total reward of a completion is the weighted sum of its terms
(trl's `reward_weights`).

Verifiable rewards (1 right, 0 otherwise): `MathAnswerReward` (the `answer` column, `verifiers.math.verify_math`),
`CodeTestsReward` (the `tests` column, `verifiers.code.run_code_tests`; runs generated code, so only built when the
user opted in), `FormatReward` (a stated final answer), `ArithmeticReward` (the share of the completion's written
equations that are true, `verifiers.arithmetic`: credit for the steps, where `math` credits only the final answer).
`RewardModelScore` scores with a sequence-classification reward model, clipped to YuLan-Mini-Instruct's PPO range
(-20, 10).

YuLan-Mini-Instruct's rule-based penalties (docs/yulan_reference.md section 6: "truncated/incomplete, mixed-language
and contentless one-sentence answers"; the report gives the categories, not the rules, so the rules below are ours):
- `TruncationPenalty`: -1 when the completion has no end-of-turn token (it ran into `max_completion_length`);
- `MixedLanguagePenalty`: -1 when the answer mixes CJK and Latin-script words and the smaller script holds at least
  `min_share` of its words (default 0.2: a Chinese answer that names `Python` once stays unpenalized), unless the
  prompt mixes them at least as much (a translation task);
- `OneSentencePenalty`: -1 when the answer has at most one sentence (no working, just a claim), or is empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from yulan_tune.verifiers.arithmetic import check_arithmetic
from yulan_tune.verifiers.math import extract_final_answer, verify_math

# PPO reward clip of YuLan-Mini-Instruct (OpenRLHF's reward_clip_range; docs/yulan_reference.md section 6)
YULAN_REWARD_CLIP = (-20.0, 10.0)

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]{2,}")  # one-letter tokens (x, a, I) are not language evidence
_SENTENCE_END = re.compile(r"[.!?。！？]+(?=\s|$)|[。！？]+")
_NUMBER_DOT = re.compile(r"(?<=\d)\.(?=\d)")  # "3.5" is not a sentence end
_FINAL_ANSWER = re.compile(r"\\boxed\s*\{|answer is", re.IGNORECASE)


def completion_text(completion: Any) -> str:
    """The text of a completion as trl passes it: a string, or a list of messages (the assistant turn)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(message.get("content", "")) for message in completion)


def prompt_text(prompt: Any) -> str:
    """The user side of a prompt (string or messages), for rules that compare the answer with the question."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") != "assistant")


# --------------------------------------------------------------------------------------------- verifiable rewards


class MathAnswerReward:
    """1.0 when the completion's final answer equals the row's `answer` (`verify_math`), else 0.0; None without one."""

    __name__ = "math_answer"

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 answer: Sequence | None = None, **columns: Any) -> list[float | None]:
        if answer is None:
            return [None] * len(completions)
        return [None if reference is None or str(reference) == "" else
                float(verify_math(completion_text(c), str(reference)).correct)
                for c, reference in zip(completions, answer)]


class CodeTestsReward:
    """1.0 when the program in the completion passes the row's `tests` (`run_code_tests`, in a limited subprocess),
    else 0.0; None without tests. Runs generated code: build it only when the user opted in."""

    __name__ = "code_tests"

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 tests: Sequence | None = None, **columns: Any) -> list[float | None]:
        from yulan_tune.verifiers.code import run_code_tests

        if tests is None:
            return [None] * len(completions)
        rewards: list[float | None] = []
        for completion, test in zip(completions, tests):
            if not test:
                rewards.append(None)
                continue
            program = extract_program(completion_text(completion))
            verdict = run_code_tests(program, test, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
            rewards.append(float(verdict.passed))
        return rewards


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(text: str) -> str:
    """The last fenced code block of a completion (```python ... ```), else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


class FormatReward:
    """1.0 when the completion states a final answer explicitly (\\boxed{...} or "The answer is ...") that
    `extract_final_answer` can read, else 0.0."""

    __name__ = "format"

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [float(bool(_FINAL_ANSWER.search(t)) and extract_final_answer(t) is not None) for t in texts]


class ArithmeticReward:
    """The share of the completion's equations ("12 + 7 = 19") that are true (`check_arithmetic`); None when it
    writes none. Weighted next to `math`, it separates a right answer reached through a false step ("7 + 1 = 6. 6 + 2
    = 8.") from one whose every step is right, which the final answer alone cannot."""

    __name__ = "arithmetic"

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float | None]:
        return [check_arithmetic(completion_text(c)).share_true for c in completions]


# ---------------------------------------------------------------------------------------------- rule-based penalties


class TruncationPenalty:
    """-1.0 when the completion ends without an end-of-turn token (cut at max_completion_length), else 0.0.

    Needs the completion's token ids (trl passes them); without ids, a completion of `max_tokens` or more tokens of
    `tokenizer` counts as truncated.
    """

    __name__ = "truncation_penalty"

    def __init__(self, end_ids: Sequence[int], *, tokenizer: Any = None, max_tokens: int | None = None):
        self.end_ids = set(end_ids)
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def truncated(self, text: str, ids: Sequence[int] | None) -> bool:
        if ids is not None:
            return not ids or ids[-1] not in self.end_ids
        if self.tokenizer is None or self.max_tokens is None:
            raise ValueError("TruncationPenalty needs completion_ids, or a tokenizer and max_tokens")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) >= self.max_tokens

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float]:
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        return [-1.0 if self.truncated(completion_text(c), i) else 0.0 for c, i in zip(completions, ids)]


def script_shares(text: str) -> tuple[int, int]:
    """(CJK words, Latin-script words): each CJK character counts as a word, each Latin run of 2+ letters as one."""
    return len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))


def mixing(text: str) -> float:
    """The share of the smaller script among CJK and Latin words (0 for single-script or empty text)."""
    cjk, latin = script_shares(text)
    return min(cjk, latin) / (cjk + latin) if cjk + latin else 0.0


class MixedLanguagePenalty:
    """-1.0 when the answer mixes CJK and Latin words with the smaller script at `min_share` or more of its words,
    unless the prompt is mixed at least as much; else 0.0."""

    __name__ = "mixed_language_penalty"

    def __init__(self, min_share: float = 0.2):
        if not 0 < min_share <= 0.5:
            raise ValueError(f"min_share must be in (0, 0.5], got {min_share}")
        self.min_share = min_share

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float]:
        rewards = []
        for prompt, completion in zip(prompts, completions):
            answer_mix = mixing(completion_text(completion))
            mixed = answer_mix >= self.min_share and mixing(prompt_text(prompt)) < answer_mix
            rewards.append(-1.0 if mixed else 0.0)
        return rewards


def count_sentences(text: str) -> int:
    """Sentences of `text`: pieces ending in . ! ? (or their CJK forms), plus an unterminated tail; decimal points
    are not sentence ends."""
    text = _NUMBER_DOT.sub("", text.strip())
    if not text:
        return 0
    pieces = [p for p in _SENTENCE_END.split(text) if p.strip()]
    return len(pieces)


class OneSentencePenalty:
    """-1.0 when the answer has at most one sentence (empty included): a claim with no content behind it."""

    __name__ = "one_sentence_penalty"

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float]:
        return [-1.0 if count_sentences(completion_text(c)) <= 1 else 0.0 for c in completions]


# ----------------------------------------------------------------------------------------------------- reward model


class RewardModelScore:
    """The score of a sequence-classification reward model (e.g. Skywork-Reward-Llama-3.1-8B, as YuLan-Mini-Instruct
    used) on the rendered conversation, clipped to `clip` (YuLan's PPO: (-20, 10)).

    The model is loaded from a local directory or hub id with safetensors and without remote code; the conversation is
    rendered with the reward model's own chat template.
    """

    __name__ = "reward_model"

    def __init__(self, model_dir: str | Path, *, clip: tuple[float, float] | None = YULAN_REWARD_CLIP,
                 batch_size: int = 8, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), use_safetensors=True, trust_remote_code=False, dtype=dtype)
        self.model.requires_grad_(False).eval()
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model.to(self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if clip is not None and clip[0] >= clip[1]:
            raise ValueError(f"reward clip {clip}: low must be below high")
        self.clip, self.batch_size = clip, batch_size

    def render(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, str) or self.tokenizer.chat_template is None:
            return prompt_text(prompt) + completion_text(completion)
        messages = list(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def scores(self, prompts: Sequence, completions: Sequence) -> list[float]:
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.device)
            logits = self.model(**batch).logits[:, 0].float()
            if self.clip is not None:
                logits = logits.clamp(*self.clip)
            out += logits.tolist()
        return out

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 **columns: Any) -> list[float]:
        return self.scores(prompts, completions)


REWARD_TERMS = ("math", "code", "format", "arithmetic", "truncation", "mixed_language", "one_sentence")
