"""Gradio chat app: talk to what you trained, side by side with where you started.

The app renders prompts with the same code that builds training data (`yulan_tune.data.chat.generation_prompt_ids`)
and stops at the same end-of-turn ids (`end_of_turn_ids`), so the model sees token for token the format SFT/DPO
trained it on (docs/yulan_reference.md section 6: `apply_chat_template(..., add_generation_prompt=True)`, BOS once).

Serving is safe by default: bound to 127.0.0.1 unless `--host` says otherwise, optional password, a per-message token
limit, a bounded queue with a concurrency limit, and a wall-clock generation timeout. Conversation history lives in
`gr.State`, which gradio keeps per browser session, so one user's turns never reach another user's prompt.

    yulan-tune app                                  # the quickstart's fine-tuned model
    yulan-tune app --compare BASE_DIR               # ... side by side with its base (`--help` prints its dir)
    python apps/chat.py --model BASE_DIR --adapter LORA_DIR --quantization 4bit
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextStreamer

from yulan_tune.data.chat import end_of_turn_ids, generation_prompt_ids
from yulan_tune.loading import YULAN_SYSTEM_PROMPT, load_model, load_tokenizer
from yulan_tune.paths import REPO_ROOT

if TYPE_CHECKING:
    import gradio as gr

# Where `make quickstart` (`yulan-tune quickstart`, default --out outputs/quickstart) writes its fine-tuned model:
# the app's default model, looked for under the working directory, then under the repository root.
QUICKSTART_MODEL_DIR = Path("outputs") / "quickstart" / "model"
AUTH_ENV_VAR = "YULAN_TUNE_APP_AUTH"
LOCALHOST = "127.0.0.1"


class AppError(ValueError):
    """A problem the user fixes by changing the command line (bad flag, missing model)."""


@dataclass
class AppConfig:
    """Everything `yulan-tune app` can be told; the defaults are the safe ones."""

    model: str | None = None  # model dir or hub id; None: the quickstart output
    adapter: str | None = None  # an unmerged (PEFT) LoRA adapter applied on top of `model`
    quantization: str | None = None  # None, "4bit" or "8bit" (bitsandbytes)
    compare: str | None = None  # a second model answering the same prompts side by side
    compare_adapter: str | None = None
    compare_quantization: str | None = None
    system_prompt: str = YULAN_SYSTEM_PROMPT  # the YuLan-Mini README's example system prompt
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.9
    max_new_tokens: int = 256  # the slider's starting value
    max_new_tokens_limit: int = 2048  # the slider's maximum (also capped by the model's context)
    max_input_tokens: int = 2048  # per user message
    generation_timeout_s: float = 120.0  # wall clock per answer, prefill included
    queue_size: int = 64  # events waiting beyond this are refused with "queue is full"
    concurrency_limit: int = 2  # answers generated at the same time, all sessions together
    host: str = LOCALHOST
    port: int | None = None  # None: gradio's first free port from 7860
    auth: tuple[str, str] | None = None


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


# ----------------------------------------------------------------------------------------------------------------------
# The gradio app


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


def build_app(models: Sequence[ChatModel], config: AppConfig | None = None) -> gr.Blocks:
    """The chat UI for one model, or two side by side. API names: /chat, /regenerate, /clear."""
    import gradio as gr

    config = config or AppConfig()
    if not 1 <= len(models) <= 2:
        raise ValueError(f"build_app takes one model or two to compare, got {len(models)}")
    models = list(models)
    empty_histories: list[list[dict[str, str]]] = [[] for _ in models]
    new_tokens_limit = max(1, min([config.max_new_tokens_limit] + [m.context_length for m in models]))

    def conversation(system_prompt: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        return system + history

    def context_problem(messages_per_model: list[list[dict[str, str]]], max_new_tokens: int) -> str | None:
        for chat_model, messages in zip(models, messages_per_model):
            prompt_tokens = len(chat_model.prompt_ids(messages))
            if prompt_tokens + max_new_tokens > chat_model.context_length:
                return (
                    f"Conversation too long: the prompt is {prompt_tokens} tokens, and with up to {max_new_tokens} "
                    f"new tokens it exceeds the {chat_model.context_length}-token context of {chat_model.name}. "
                    "Press Clear to start a new conversation, or lower max new tokens."
                )
        return None

    def message_problem(
        message: str, histories: list[list[dict[str, str]]], system_prompt: str, max_new_tokens: int
    ) -> str | None:
        """Why this message cannot be answered (empty, too long, conversation past the context), or None."""
        if not message.strip():
            return "The message is empty: type something first."
        for chat_model in models:
            message_tokens = chat_model.count_tokens(message)
            if message_tokens > config.max_input_tokens:
                return (
                    f"Message too long: it is {message_tokens} tokens and this app accepts at most "
                    f"{config.max_input_tokens} tokens per message. Shorten it and send it again."
                )
        turn = [conversation(system_prompt, h + [{"role": "user", "content": message}]) for h in histories]
        return context_problem(turn, max_new_tokens)

    def validate_chat(
        message: str,
        histories: list[list[dict[str, str]]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> list[dict[str, Any]]:
        # gradio runs this before the event enters the queue: a refused message costs no queue slot, its reason is
        # shown under the message box (gradio_client raises it), and the conversation stays as it was.
        problem = message_problem(message, histories, system_prompt, int(max_new_tokens))
        return [gr.validate(problem is None, problem or "")] + [gr.validate(True, "") for _ in range(5)]

    def answer(
        histories: list[list[dict[str, str]]],
        system_prompt: str,
        settings: GenerationSettings,
    ) -> Iterator[tuple[list[list[dict[str, str]]], str]]:
        """Stream every model's answer to the last user turn; yields (histories with partial answers, stats)."""
        conversations = [conversation(system_prompt, history) for history in histories]
        try:
            for replies in stream_replies(models, conversations, settings, timeout_s=config.generation_timeout_s):
                partial = [h + [{"role": "assistant", "content": r.text}] for h, r in zip(histories, replies)]
                yield partial, format_stats(models, replies)
        except TimeoutError as error:
            raise gr.Error(str(error), title="Generation timed out") from error

    def settings_from(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
        return GenerationSettings(float(temperature), float(top_p), int(max_new_tokens))

    def chat(
        message: str,
        histories: list[list[dict[str, str]]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        settings = settings_from(temperature, top_p, max_new_tokens)
        turn = [history + [{"role": "user", "content": message}] for history in histories]  # checked by validate_chat
        for partial, stats in answer(turn, system_prompt, settings):
            yield ("", *partial, stats, partial)

    def regenerate(
        histories: list[list[dict[str, str]]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        if not histories[0]:
            raise gr.Error(
                "Nothing to regenerate yet: send a message first.", title="Nothing to regenerate", print_exception=False
            )
        settings = settings_from(temperature, top_p, max_new_tokens)
        # drop the last answer of every model, keep the user turn that asked for it
        turn = [history[:-1] if history[-1]["role"] == "assistant" else history for history in histories]
        problem = context_problem([conversation(system_prompt, h) for h in turn], settings.max_new_tokens)
        if problem:
            raise gr.Error(problem, title="Conversation too long", print_exception=False)
        for partial, stats in answer(turn, system_prompt, settings):
            yield (*partial, stats, partial)

    def clear() -> tuple[Any, ...]:
        return (*[[] for _ in models], "", [[] for _ in models])

    with gr.Blocks(title="YuLan chat", analytics_enabled=False) as demo:
        # Per-session: gradio deep-copies a State's initial value for each browser session / API client.
        histories = gr.State(empty_histories)
        with gr.Sidebar(label="Generation settings", open=True):
            system_prompt = gr.Textbox(value=config.system_prompt, label="System prompt", lines=4)
            temperature = gr.Slider(0, 2, value=config.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=config.top_p, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(
                1, new_tokens_limit, value=min(config.max_new_tokens, new_tokens_limit), step=1, label="Max new tokens"
            )
        gr.Markdown("## YuLan chat" + ("" if len(models) == 1 else ": the same prompts to two models"))
        with gr.Row():
            chatbots = [
                gr.Chatbot(
                    label=m.name if len(models) == 1 else f"{'AB'[i]}: {m.name}",
                    elem_id=f"chatbot-{i}",
                    height=440,
                    buttons=["copy"],
                    feedback_options=None,
                )
                for i, m in enumerate(models)
            ]
        stats = gr.Markdown(elem_id="stats")
        with gr.Row():
            message = gr.Textbox(
                label="Message",  # shown with the reason when validate_chat refuses a message
                show_label=False,
                max_lines=8,
                placeholder="Type a message and press Enter",
                scale=8,
                autofocus=True,
                elem_id="message",
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        settings_inputs = [system_prompt, temperature, top_p, max_new_tokens]
        # chat and regenerate share one concurrency slot pool: at most `concurrency_limit` generations at a time.
        limits = dict(concurrency_limit=config.concurrency_limit, concurrency_id="generate")
        gr.on(
            [message.submit, send.click],
            chat,
            inputs=[message, histories, *settings_inputs],
            outputs=[message, *chatbots, stats, histories],
            validator=validate_chat,
            api_name="chat",
            **limits,
        )
        regenerate_button.click(
            regenerate,
            inputs=[histories, *settings_inputs],
            outputs=[*chatbots, stats, histories],
            api_name="regenerate",
            **limits,
        )
        # the chatbots' own trash icons must forget the history too, not just empty the display
        gr.on(
            [clear_button.click, *(chatbot.clear for chatbot in chatbots)],
            clear,
            outputs=[*chatbots, stats, histories],
            api_name="clear",
            concurrency_limit=None,
        )
    demo.queue(max_size=config.queue_size, default_concurrency_limit=config.concurrency_limit)
    return demo


def serve(demo: gr.Blocks, config: AppConfig, *, block: bool = True) -> gr.Blocks:
    """Launch with the config's host, port and password; `block=False` returns once the server answers."""
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        auth=config.auth,
        auth_message=f"Log in with the user:password given to --auth or ${AUTH_ENV_VAR}." if config.auth else None,
        share=False,
        prevent_thread_lock=not block,
        quiet=not block,
        ssr_mode=False,
        mcp_server=False,
    )
    return demo


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise AppError(f"--auth / ${AUTH_ENV_VAR} must look like user:password (both non-empty), got {value!r}")
    return user, password


def quickstart_candidates() -> list[Path]:
    return [Path.cwd() / QUICKSTART_MODEL_DIR, REPO_ROOT / QUICKSTART_MODEL_DIR]


def resolve_model(model: str | None) -> str:
    """The model to serve: the one asked for, else the quickstart's output, else a message saying how to get one."""
    if model is not None:
        return model
    for candidate in quickstart_candidates():
        if (candidate / "config.json").exists():
            return str(candidate)
    looked = " and ".join(str(c) for c in dict.fromkeys(quickstart_candidates()))
    raise AppError(
        f"no --model given and no quickstart model at {looked}. Run `make quickstart` (or `yulan-tune quickstart`) "
        "to fine-tune the tiny offline YuLan there (a few minutes on a CPU), or pass --model DIR (a model directory "
        "or hub id such as yulan-team/YuLan-Mini-Instruct), optionally with --adapter LORA_DIR."
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = AppConfig()
    from yulan_tune.modeling.tiny import default_tiny_dir

    parser = argparse.ArgumentParser(
        prog="yulan-tune app",
        description="Chat with a model in the browser (streaming), optionally side by side with a second one.",
        epilog=f"Fine-tuned vs base after `make quickstart`: yulan-tune app --compare {default_tiny_dir()}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help=f"model dir or hub id (default: the quickstart output {QUICKSTART_MODEL_DIR})")
    parser.add_argument("--adapter", help="an unmerged LoRA adapter dir to apply on top of --model")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], help="load --model quantized with bitsandbytes")
    parser.add_argument("--compare", metavar="OTHER", help="a second model answering the same prompts side by side")
    parser.add_argument("--compare-adapter", help="an unmerged LoRA adapter dir to apply on top of --compare")
    parser.add_argument("--compare-quantization", choices=["4bit", "8bit"], help="load --compare quantized")
    parser.add_argument("--system-prompt", default=defaults.system_prompt, help="initial value (editable in the page)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="initial value; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="initial value")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="initial value")
    parser.add_argument("--max-input-tokens", type=int, default=defaults.max_input_tokens, help="per user message")
    parser.add_argument("--generation-timeout", type=float, default=defaults.generation_timeout_s, help="seconds")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help="requests that may wait; more are refused")
    parser.add_argument("--concurrency-limit", type=int, default=defaults.concurrency_limit,
                        help="answers generated at the same time")
    parser.add_argument("--host", default=defaults.host, help="interface to bind; 127.0.0.1 is this machine only")
    parser.add_argument("--port", type=int, default=None, help="if not given: the first free port from 7860")
    parser.add_argument("--auth", help=f"user:password required to open the app (or set ${AUTH_ENV_VAR})")
    return parser


def config_from_args(args: argparse.Namespace) -> AppConfig:
    for flag, value in [
        ("--max-new-tokens", args.max_new_tokens),
        ("--max-input-tokens", args.max_input_tokens),
        ("--queue-size", args.queue_size),
        ("--concurrency-limit", args.concurrency_limit),
    ]:
        if value < 1:
            raise AppError(f"{flag} must be at least 1, got {value}")
    if args.generation_timeout <= 0:
        raise AppError(f"--generation-timeout must be positive, got {args.generation_timeout}")
    return AppConfig(
        model=resolve_model(args.model),
        adapter=args.adapter,
        quantization=args.quantization,
        compare=args.compare,
        compare_adapter=args.compare_adapter,
        compare_quantization=args.compare_quantization,
        system_prompt=args.system_prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_input_tokens=args.max_input_tokens,
        generation_timeout_s=args.generation_timeout,
        queue_size=args.queue_size,
        concurrency_limit=args.concurrency_limit,
        host=args.host,
        port=args.port,
        auth=parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV_VAR)),
    )


def check_local_path(flag: str, value: str | None) -> None:
    """A value written as a path must exist: fail now with the flag's name instead of after hub lookups and retries."""
    if value is None or Path(value).exists():
        return
    looks_like_path = Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1
    if looks_like_path:
        raise AppError(f"{flag} {value}: no such directory")


def load_models(config: AppConfig) -> list[ChatModel]:
    assert config.model is not None, "resolve the model first (resolve_model)"
    models = [ChatModel.load(config.model, adapter=config.adapter, quantization=config.quantization)]
    if config.compare is not None:
        models.append(
            ChatModel.load(config.compare, adapter=config.compare_adapter, quantization=config.compare_quantization)
        )
    return models


def cpu_threads_per_generation(concurrency_limit: int) -> int:
    """Torch threads per generation so that `concurrency_limit` concurrent generations share the cores, not fight.

    Each concurrent generate() opens its own OpenMP team; teams that together exceed the cores spin-wait on each
    other (measured 5x slower for the tiny model on 2 busy cores with 2 threads instead of 1).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // concurrency_limit)


def app_main(argv: list[str] | None = None) -> int:
    """`yulan-tune app ...`: load the model(s) and serve the chat until interrupted."""
    try:
        config = config_from_args(build_parser().parse_args(argv))
        for flag, value in [("--model", config.model), ("--adapter", config.adapter), ("--compare", config.compare),
                            ("--compare-adapter", config.compare_adapter)]:
            check_local_path(flag, value)
        models = load_models(config)
    except (AppError, OSError, ValueError) as error:  # loading.ModelNotFoundError is an OSError; peft raises ValueError
        print(f"yulan-tune app: error: {error}", file=sys.stderr)
        return 2
    if config.host != LOCALHOST and config.auth is None:
        print(
            f"yulan-tune app: warning: serving on {config.host} without a password; anyone who can reach this port "
            f"can use the model (set --auth user:password or ${AUTH_ENV_VAR})",
            file=sys.stderr,
        )
    if all(m.model.device.type == "cpu" for m in models):
        torch.set_num_threads(cpu_threads_per_generation(config.concurrency_limit))
    serve(build_app(models, config), config, block=True)
    return 0
