"""`yulan-tune [--debug] <command> ...`: one entry point; each command lives in `yulan_tune.commands` and is imported
only when it runs. A user error ends in one line on stderr and exit status 2 (`yulan_tune.console.run_command`);
`--debug` (or YULAN_TUNE_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import importlib
import sys

from yulan_tune.console import configure_logging, run_command

# command -> (module in yulan_tune.commands with main(argv) -> exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "build the tiny YuLan, fine-tune it, report accuracy"),
    "tiny": ("tiny", "build the offline tiny YuLan (tokenizer + model) into a dir"),
    "sft": ("sft", "supervised fine-tuning (full / LoRA / QLoRA) from a YAML config"),
    "dpo": ("dpo", "preference training (DPO, IPO, SimPO, ORPO, KTO) from a YAML config"),
    "pairs": ("pairs", "on-policy preference pairs: sample K answers per prompt, label by verifier or reward model"),
    "grpo": ("grpo", "RL with verifiable rewards (GRPO; KL control, YuLan's penalties) from a YAML config"),
    "pretrain": ("pretrain", "pretrain a yulanmini model (muP, WSD, curriculum)"),
    "anneal": ("anneal", "anneal from a pre-annealing checkpoint with its optimizer states"),
    "clean": ("clean", "clean raw text with datatrove: filters, decontamination, dedup, quality buckets"),
    "prepare-data": ("prepare_data", "tokenize and pack raw corpora for pretraining"),
    "check-data": ("check_data", "validate a dataset and show a rendered sample"),
    "convert": ("convert", "convert between yulanmini and Llama checkpoints"),
    "export": ("export", "export for serving: GGUF (llama.cpp, Ollama) or a merged plain Llama dir (vLLM, SGLang)"),
    "merge": ("merge", "merge a LoRA adapter into a bf16 base (also QLoRA; as export --to hf)"),
    "eval": ("eval", "evaluate a model: lm-eval tasks (--tasks), else held-out math exact-match"),
    "dynamics": ("dynamics", "training dynamics of a series of checkpoints: norms, spectra, CKA, probe loss"),
    "compare": ("compare", "several models or eval runs on the same tasks: table, paired test, chart"),
    "synth": ("synth", "synthesize math / code / rewrite data with a model or server, verified, resumable"),
    "rejection-sample": ("rejection_sample", "sample solutions from an SFT model, keep the verified, fine-tune, measure"),
    "app": ("app", "Gradio chat app to try a model"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: yulan-tune [--debug] <command> [args]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n--debug: show the traceback of an error instead of its one-line message")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    argv = argv[1:] if debug else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"yulan-tune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()  # before the command's libraries are imported: some log at import
    module = importlib.import_module(f"yulan_tune.commands.{COMMANDS[command][0]}")
    return run_command(f"yulan-tune {command}", module.main, rest, debug=debug)


if __name__ == "__main__":
    raise SystemExit(main())
