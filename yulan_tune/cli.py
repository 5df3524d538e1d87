"""`yulan-tune <command> ...`: one entry point; each command lives with the code it runs and is imported lazily."""

from __future__ import annotations

import importlib
import sys

# command -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("yulan_tune.quickstart:quickstart_main", "build the tiny YuLan, fine-tune it, report accuracy"),
    "tiny": ("yulan_tune.modeling.tiny:tiny_main", "build the offline tiny YuLan (tokenizer + model) into a dir"),
    "sft": ("yulan_tune.sft:sft_main", "supervised fine-tuning (full / LoRA / QLoRA) from a YAML config"),
    "dpo": ("yulan_tune.dpo:dpo_main", "preference training (DPO, IPO, SimPO, ORPO, KTO) from a YAML config"),
    "pretrain": ("yulan_tune.pretrain:pretrain_main", "pretrain a yulanmini model (muP, WSD, curriculum)"),
    "anneal": ("yulan_tune.anneal:anneal_main", "anneal from a pre-annealing checkpoint with its optimizer states"),
    "prepare-data": ("yulan_tune.data.packing:prepare_data_main", "tokenize and pack raw corpora for pretraining"),
    "check-data": ("yulan_tune.data.formats:check_data_main", "validate a dataset and show a rendered sample"),
    "convert": ("yulan_tune.modeling.convert:convert_main", "convert between yulanmini and Llama checkpoints"),
    "merge": ("yulan_tune.export:merge_main", "merge a LoRA adapter into a bf16 base (also QLoRA adapters)"),
    "eval": ("yulan_tune.eval:eval_main", "held-out math exact-match accuracy of a model"),
    "app": ("yulan_tune.app:app_main", "Gradio chat app to try a model"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: yulan-tune <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"yulan-tune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
