"""Gradio chat app: talk to what you trained, side by side with where you started.

The replies come from `yulan_tune.chat_session` (prompts rendered as in training, streamed token by token); this module
is the page around them, and `yulan_tune.commands.app` the command line that loads the models and serves it. gradio is
an optional dependency (the `app` extra), imported only when the page is built.

Serving is safe by default: bound to 127.0.0.1 unless `--host` says otherwise, optional password, a per-message token
limit, a bounded queue with a concurrency limit, and a wall-clock generation timeout. Conversation history lives in
`gr.State`, which gradio keeps per browser session, so one user's turns never reach another user's prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yulan_tune.chat_session import ChatModel, GenerationSettings, format_stats, stream_replies
from yulan_tune.loading import YULAN_SYSTEM_PROMPT

if TYPE_CHECKING:
    import gradio as gr

AUTH_ENV_VAR = "YULAN_TUNE_APP_AUTH"
LOCALHOST = "127.0.0.1"

Messages = list[dict[str, str]]  # one conversation: {"role": ..., "content": ...} turns
Histories = list[Messages]  # one conversation per model, all with the same user turns


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


class ChatApp:
    """The chat UI for one model, or two side by side: each gradio event handler is a method, `build` wires them.

    API names: /chat, /regenerate, /clear. The handlers get the per-session histories from gradio (a `gr.State`) and
    return the new ones, so one ChatApp serves every session.
    """

    def __init__(self, models: Sequence[ChatModel], config: AppConfig | None = None) -> None:
        if not 1 <= len(models) <= 2:
            raise ValueError(f"build_app takes one model or two to compare, got {len(models)}")
        self.models = list(models)
        self.config = config or AppConfig()

    @property
    def new_tokens_limit(self) -> int:
        """The max-new-tokens slider's maximum: the config's limit, capped by every model's context."""
        return max(1, min([self.config.max_new_tokens_limit] + [m.context_length for m in self.models]))

    @staticmethod
    def conversation(system_prompt: str, history: Messages) -> Messages:
        system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        return system + history

    @staticmethod
    def settings_from(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
        return GenerationSettings(float(temperature), float(top_p), int(max_new_tokens))

    def context_problem(self, messages_per_model: Histories, max_new_tokens: int) -> str | None:
        for chat_model, messages in zip(self.models, messages_per_model):
            prompt_tokens = len(chat_model.prompt_ids(messages))
            if prompt_tokens + max_new_tokens > chat_model.context_length:
                return (
                    f"Conversation too long: the prompt is {prompt_tokens} tokens, and with up to {max_new_tokens} "
                    f"new tokens it exceeds the {chat_model.context_length}-token context of {chat_model.name}. "
                    "Press Clear to start a new conversation, or lower max new tokens."
                )
        return None

    def message_problem(
        self, message: str, histories: Histories, system_prompt: str, max_new_tokens: int
    ) -> str | None:
        """Why this message cannot be answered (empty, too long, conversation past the context), or None."""
        if not message.strip():
            return "The message is empty: type something first."
        for chat_model in self.models:
            message_tokens = chat_model.count_tokens(message)
            if message_tokens > self.config.max_input_tokens:
                return (
                    f"Message too long: it is {message_tokens} tokens and this app accepts at most "
                    f"{self.config.max_input_tokens} tokens per message. Shorten it and send it again."
                )
        turn = [self.conversation(system_prompt, h + [{"role": "user", "content": message}]) for h in histories]
        return self.context_problem(turn, max_new_tokens)

    def validate_chat(
        self,
        message: str,
        histories: Histories,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> list[dict[str, Any]]:
        # gradio runs this before the event enters the queue: a refused message costs no queue slot, its reason is
        # shown under the message box (gradio_client raises it), and the conversation stays as it was.
        import gradio as gr

        problem = self.message_problem(message, histories, system_prompt, int(max_new_tokens))
        return [gr.validate(problem is None, problem or "")] + [gr.validate(True, "") for _ in range(5)]

    def answer(
        self, histories: Histories, system_prompt: str, settings: GenerationSettings
    ) -> Iterator[tuple[Histories, str]]:
        """Stream every model's answer to the last user turn; yields (histories with partial answers, stats)."""
        import gradio as gr

        conversations = [self.conversation(system_prompt, history) for history in histories]
        timeout_s = self.config.generation_timeout_s
        try:
            for replies in stream_replies(self.models, conversations, settings, timeout_s=timeout_s):
                partial = [h + [{"role": "assistant", "content": r.text}] for h, r in zip(histories, replies)]
                yield partial, format_stats(self.models, replies)
        except TimeoutError as error:
            raise gr.Error(str(error), title="Generation timed out") from error

    def chat(
        self,
        message: str,
        histories: Histories,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        """/chat: outputs (cleared message box, every chatbot, stats, new histories)."""
        settings = self.settings_from(temperature, top_p, max_new_tokens)
        turn = [history + [{"role": "user", "content": message}] for history in histories]  # checked by validate_chat
        for partial, stats in self.answer(turn, system_prompt, settings):
            yield ("", *partial, stats, partial)

    def regenerate(
        self,
        histories: Histories,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        """/regenerate: answer the last user turn again; outputs (every chatbot, stats, new histories)."""
        import gradio as gr

        if not histories[0]:
            raise gr.Error(
                "Nothing to regenerate yet: send a message first.", title="Nothing to regenerate", print_exception=False
            )
        settings = self.settings_from(temperature, top_p, max_new_tokens)
        # drop the last answer of every model, keep the user turn that asked for it
        turn = [history[:-1] if history[-1]["role"] == "assistant" else history for history in histories]
        problem = self.context_problem([self.conversation(system_prompt, h) for h in turn], settings.max_new_tokens)
        if problem:
            raise gr.Error(problem, title="Conversation too long", print_exception=False)
        for partial, stats in self.answer(turn, system_prompt, settings):
            yield (*partial, stats, partial)

    def clear(self) -> tuple[Any, ...]:
        """/clear: outputs (every chatbot emptied, stats emptied, empty histories)."""
        return (*[[] for _ in self.models], "", [[] for _ in self.models])

    def build(self) -> gr.Blocks:
        """The page: settings sidebar, one chatbot per model, message box and buttons, wired to the handlers."""
        import gradio as gr

        config, new_tokens_limit = self.config, self.new_tokens_limit
        with gr.Blocks(title="YuLan chat", analytics_enabled=False) as demo:
            # Per-session: gradio deep-copies a State's initial value for each browser session / API client.
            histories = gr.State([[] for _ in self.models])
            with gr.Sidebar(label="Generation settings", open=True):
                system_prompt = gr.Textbox(value=config.system_prompt, label="System prompt", lines=4)
                temperature = gr.Slider(0, 2, value=config.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=config.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(
                    1, new_tokens_limit, value=min(config.max_new_tokens, new_tokens_limit), step=1,
                    label="Max new tokens",
                )
            gr.Markdown("## YuLan chat" + ("" if len(self.models) == 1 else ": the same prompts to two models"))
            with gr.Row():
                chatbots = [
                    gr.Chatbot(
                        label=m.name if len(self.models) == 1 else f"{'AB'[i]}: {m.name}",
                        elem_id=f"chatbot-{i}",
                        height=440,
                        buttons=["copy"],
                        feedback_options=None,
                    )
                    for i, m in enumerate(self.models)
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
                self.chat,
                inputs=[message, histories, *settings_inputs],
                outputs=[message, *chatbots, stats, histories],
                validator=self.validate_chat,
                api_name="chat",
                **limits,
            )
            regenerate_button.click(
                self.regenerate,
                inputs=[histories, *settings_inputs],
                outputs=[*chatbots, stats, histories],
                api_name="regenerate",
                **limits,
            )
            # the chatbots' own trash icons must forget the history too, not just empty the display
            gr.on(
                [clear_button.click, *(chatbot.clear for chatbot in chatbots)],
                self.clear,
                outputs=[*chatbots, stats, histories],
                api_name="clear",
                concurrency_limit=None,
            )
        demo.queue(max_size=config.queue_size, default_concurrency_limit=config.concurrency_limit)
        return demo


def build_app(models: Sequence[ChatModel], config: AppConfig | None = None) -> gr.Blocks:
    """The chat UI for one model, or two side by side. API names: /chat, /regenerate, /clear."""
    return ChatApp(models, config).build()


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
