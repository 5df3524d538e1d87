"""Replies from one or more chat models, streamed token by token: what the chat app runs, without any UI.

Prompts are rendered with the same code that builds training data (`yulan_tune.data.chat.generation_prompt_ids`) and
generation stops at the same end-of-turn ids (`end_of_turn_ids`), so the model sees token for token the format SFT/DPO
trained it on (docs/yulan_reference.md section 6: `apply_chat_template(..., add_generation_prompt=True)`, BOS once).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextStreamer

from yulan_tune.data.chat import end_of_turn_ids, generation_prompt_ids
from yulan_tune.loading import load_model, load_tokenizer


@dataclass
class GenerationSettings:
    temperature: float
    top_p: float
    max_new_tokens: int

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Reply:
    """One model's answer as it streams; `stop_reason` is None until generation has finished."""

    text: str = ""
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    stop_reason: str | None = None  # "end of turn" | "max new tokens" | "timeout" | "cancelled"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatModel:
    """A loaded model with its tokenizer and the ids that end an assistant turn."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike,
        *,
        adapter: str | os.PathLike | None = None,
        quantization: str | None = None,
        name: str | None = None,
    ) -> ChatModel:
        tokenizer = load_tokenizer(name_or_path)
        model = load_model(name_or_path, quantization=quantization, adapter=adapter)
        model.eval()
        if quantization is None:  # a pre-quantized checkpoint (its config.json carries the quantization)
            quantization = "4bit" if getattr(model, "is_loaded_in_4bit", False) else None
            quantization = "8bit" if getattr(model, "is_loaded_in_8bit", False) else quantization
        chat_model = cls(
            name=name or describe_model(name_or_path, adapter, quantization),
            model=model,
            tokenizer=tokenizer,
            stop_ids=end_of_turn_ids(tokenizer),
        )
        # One token before serving: the first eval forward of a bitsandbytes 4-bit model on CPU repacks its weights in
        # place (docs/stack_notes.md), which must not race between concurrent requests; it also takes lazy init off the
        # first user's latency.
        for _ in stream_replies([chat_model], [[{"role": "user", "content": "Hi"}]], GenerationSettings(0, 1, 1)):
            pass
        return chat_model

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return generation_prompt_ids(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        # verbose=False: an over-long message is expected here and answered with a message, not a tokenizer warning
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def describe_model(name_or_path: str | os.PathLike, adapter: str | os.PathLike | None, quantization: str | None) -> str:
    name = str(name_or_path)
    if adapter is not None:
        name += f" + adapter {adapter}"
    if quantization is not None:
        name += f" ({quantization})"
    return name


# ----------------------------------------------------------------------------------------------------------------------
# Streaming generation: one thread per model, all feeding one queue, so a side-by-side turn streams both at once.


class _QueueStreamer(TextStreamer):
    """Sends one model's decoded text and token count to a queue shared by every model answering the turn."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, index: int, events: queue.Queue) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.index = index
        self.events = events
        self.prompt_seen = False
        self.new_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate() sends the prompt first, then one tensor per new token
            self.new_tokens += value.numel()
            self.events.put(("tokens", self.index, self.new_tokens))
        self.prompt_seen = True
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.events.put(("text", self.index, text))


class _StopWhenSet(StoppingCriteria):
    """Stops generation when the session that asked for it has gone away (the consumer closed its generator)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_into(
    chat_model: ChatModel,
    prompt_ids: list[int],
    settings: GenerationSettings,
    timeout_s: float,
    index: int,
    events: queue.Queue,
    cancel: threading.Event,
) -> None:
    try:
        device = chat_model.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p}
        with torch.inference_mode():
            output = chat_model.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=not settings.greedy,
                **sampling,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=chat_model.stop_ids,
                pad_token_id=chat_model.tokenizer.pad_token_id,
                max_time=timeout_s,  # transformers' MaxTimeCriteria: the generation timeout
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]),
                streamer=_QueueStreamer(chat_model.tokenizer, index, events),
            )
        events.put(("done", index, output[0, len(prompt_ids) :].tolist()))
    except BaseException as error:  # reported to the consumer, which raises it in the request's own thread
        events.put(("error", index, error))


def _stop_reason(new_ids: list[int], stop_ids: list[int], settings: GenerationSettings, cancelled: bool) -> str:
    if new_ids and new_ids[-1] in stop_ids:
        return "end of turn"
    if len(new_ids) >= settings.max_new_tokens:
        return "max new tokens"
    return "cancelled" if cancelled else "timeout"


def stream_replies(
    models: Sequence[ChatModel],
    conversations: Sequence[Sequence[dict[str, str]]],
    settings: GenerationSettings,
    *,
    timeout_s: float = 120.0,
) -> Iterator[list[Reply]]:
    """Generate one reply per (model, conversation) concurrently; yield every reply's state whenever any of them grows.

    The final yield has every `stop_reason` set and each text decoded from the exact generated ids (end-of-turn token
    removed). Closing the iterator early stops the generations at their next token.
    """
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    replies = [Reply() for _ in models]
    prompts = [chat_model.prompt_ids(messages) for chat_model, messages in zip(models, conversations, strict=True)]
    start = time.perf_counter()
    workers = [
        threading.Thread(
            target=_generate_into,
            args=(chat_model, prompt, settings, timeout_s, index, events, cancel),
            name=f"yulan-tune-generate-{index}",
            daemon=True,
        )
        for index, (chat_model, prompt) in enumerate(zip(models, prompts))
    ]
    for worker in workers:
        worker.start()
    try:
        running = len(workers)
        while running:
            # generate() itself stops at timeout_s; the margin covers a worker stuck outside generate.
            kind, index, payload = events.get(timeout=timeout_s + 30)
            reply = replies[index]
            reply.seconds = time.perf_counter() - start
            if kind == "tokens":
                reply.new_tokens = payload
                if reply.first_token_seconds is None:
                    reply.first_token_seconds = reply.seconds
                continue  # text events carry the visible change
            if kind == "text":
                reply.text += payload
            elif kind == "error":
                raise payload
            else:  # done: replace the streamed text by the exact decoding of what was generated
                chat_model, new_ids = models[index], payload
                stop_reason = _stop_reason(new_ids, chat_model.stop_ids, settings, cancel.is_set())
                kept = new_ids[:-1] if stop_reason == "end of turn" else new_ids
                reply.text = chat_model.tokenizer.decode(kept, skip_special_tokens=True)
                reply.new_tokens = len(new_ids)
                reply.stop_reason = stop_reason
                running -= 1
            yield [replace(r) for r in replies]
    except queue.Empty:
        raise TimeoutError(f"no answer within the generation timeout of {timeout_s:.0f} s") from None
    finally:
        cancel.set()
        for worker in workers:
            worker.join(timeout=5)


def format_stats(models: Sequence[ChatModel], replies: Sequence[Reply]) -> str:
    lines = []
    for chat_model, reply in zip(models, replies):
        line = (
            f"**{chat_model.name}**: {reply.new_tokens} tokens in {reply.seconds:.2f} s, "
            f"**{reply.tokens_per_second:.1f} tokens/s**"
        )
        if reply.first_token_seconds is not None:
            line += f", first token after {reply.first_token_seconds:.2f} s"
        line += f" ({reply.stop_reason})" if reply.stop_reason else " (generating...)"
        lines.append(line)
    return "\n\n".join(lines)
