"""Chat rendering and assistant-only loss masks that are exact for any chat template.

A template renders a conversation to text; we need to know which tokens of that text the assistant wrote. Instead
of relying on `{% generation %}` markers (most templates have none), render the conversation prefix by prefix:
assistant turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end of
`render(messages[:i + 1])`. Both must be prefixes of the full rendering (checked: a template that rewrites earlier
turns, e.g. one that drops old reasoning, gets a clear error). The full text is tokenized once and a token is trained
when its first character lies in an assistant span, so the masks follow the real tokenization of the whole
conversation, not of pieces tokenized apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from yulan_tune.conventions import END_OF_TURN_TOKEN, IGNORE_INDEX


class ChatTemplateError(ValueError):
    pass


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the model is not trained

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    if not tokenizer.chat_template:
        raise ChatTemplateError("the tokenizer has no chat template; load it with yulan_tune.load_tokenizer(...)")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, with BOS exactly once (from the template, else the tokenizer)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _tokenizer_adds_bos(tokenizer):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    return ids, offsets


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans written by the assistant (content plus end-of-turn markup)."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if i and not through.startswith(before):
            raise ChatTemplateError(
                f"chat template is not prefix-stable at message {i}: the generation prompt is not a prefix of the "
                "rendered assistant turn, so assistant tokens cannot be located"
            )
        if not full.startswith(through):
            raise ChatTemplateError(
                f"chat template is not prefix-stable at message {i}: rendering the first {i + 1} messages is not a "
                "prefix of rendering them all (does the template rewrite earlier turns?)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> TokenizedConversation:
    """input_ids of the rendered conversation and labels that train exactly the assistant's tokens."""
    full, spans = assistant_spans(tokenizer, messages)
    ids, offsets = _encode(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        if end <= start:  # added BOS or zero-width token: never trained
            continue
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[position] = ids[position]
    return TokenizedConversation(ids, labels)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> TokenizedConversation:
    """Plain text: BOS + text + EOS, every token but BOS trained (continued-pretraining style SFT rows)."""
    ids, _ = _encode(tokenizer, text)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]
    return TokenizedConversation(ids, [IGNORE_INDEX] + ids[1:])


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> list[int]:
    """What the model sees at inference: the conversation so far plus the assistant header; BOS exactly once."""
    ids, _ = _encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
    return ids


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: EOS plus <|eot_id|> where the vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = tokenizer.get_vocab().get(END_OF_TURN_TOKEN)
    return ids + ([eot] if eot is not None and eot not in ids else [])
