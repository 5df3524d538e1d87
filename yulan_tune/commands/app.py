"""`yulan-tune app` / `python apps/chat.py`: resolve and load the model(s) the command line names, then serve the chat.

    yulan-tune app                                  # the quickstart's fine-tuned model
    yulan-tune app --compare BASE_DIR               # ... side by side with its base (`--help` prints its dir)
    python apps/chat.py --model BASE_DIR --adapter LORA_DIR --quantization 4bit

The UI is yulan_tune/app.py, generation yulan_tune/chat_session.py; gradio is imported only when the app is built, so
`--help` and the argument checks work without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from yulan_tune.app import AUTH_ENV_VAR, LOCALHOST, AppConfig, build_app, serve
from yulan_tune.chat_session import ChatModel
from yulan_tune.paths import REPO_ROOT
from yulan_tune.tiny import default_tiny_dir

# Where `make quickstart` (`yulan-tune quickstart`, default --out outputs/quickstart) writes its fine-tuned model:
# the app's default model, looked for under the working directory, then under the repository root.
QUICKSTART_MODEL_DIR = Path("outputs") / "quickstart" / "model"


class AppError(ValueError):
    """A problem the user fixes by changing the command line (bad flag, missing model)."""


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


def main(argv: list[str]) -> int:
    """`yulan-tune app ...`: load the model(s) and serve the chat until interrupted."""
    config = config_from_args(build_parser().parse_args(argv))
    for flag, value in [("--model", config.model), ("--adapter", config.adapter), ("--compare", config.compare),
                        ("--compare-adapter", config.compare_adapter)]:
        check_local_path(flag, value)
    try:
        models = load_models(config)
    except OSError as error:  # transformers and peft report a missing or unreadable model as a bare OSError
        raise FileNotFoundError(str(error)) from error
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
