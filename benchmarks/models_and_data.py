"""What the benchmarks train, alike on both sides of a comparison: the model (the tiny YuLan on CPU, a randomly
initialized YuLan-Mini-shaped Llama on GPU), the SFT and DPO data files, and the recipe configs whose defaults the
benchmarks start from.
"""

from __future__ import annotations

import ast
import json
import os
import random
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPO_ROOT

RECIPE_CONFIGS = REPO_ROOT / "recipes" / "configs"


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


# ----------------------------------------------------------------------------------------------------------- models

# The released YuLan-Mini (docs/yulan_reference.md 1.1): the "full-size" shape of the GPU runs, random init.
YULAN_MINI_SHAPE = dict(
    hidden_size=1920,
    num_hidden_layers=56,
    num_attention_heads=30,
    num_key_value_heads=6,
    intermediate_size=4800,
    vocab_size=99000,
)


def full_size_llama_config(tokenizer: Any, shape: dict[str, int] | None = None) -> Any:
    """The released YuLan-Mini as a LlamaConfig (docs/yulan_reference.md 1.1: q/k/v bias, untied head, head_dim 64,
    rope_theta 490000), with the tokenizer's special ids. `shape` overrides sizes (tests use a small one)."""
    from transformers import LlamaConfig

    shape = {**YULAN_MINI_SHAPE, **(shape or {})}
    return LlamaConfig(
        **shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"], hidden_act="silu",
        attention_bias=True, mlp_bias=False, rms_norm_eps=1e-6, rope_theta=490000.0, max_position_embeddings=28723,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )


def save_full_size_llama(out_dir: str | os.PathLike, shape: dict[str, int] | None = None) -> Path:
    """A randomly initialized YuLan-Mini-shaped Llama (bf16 safetensors) with the tiny YuLan tokenizer, which has
    YuLan-Mini's special ids; its 4096 tokens are a subset of the 99000-row vocabulary, and throughput does not
    depend on which ids are used. Initialized on the GPU when there is one (seconds instead of minutes)."""
    from transformers import LlamaForCausalLM

    from yulan_tune.tiny import build_tiny_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tiny_tokenizer(out)
    config = full_size_llama_config(tokenizer, shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def default_model_dir(device: str, workdir: Path) -> str:
    """The model a benchmark trains when none is given: full-size YuLan-Mini shape on GPU, the tiny YuLan on CPU."""
    if device == "cuda":
        return str(save_full_size_llama(workdir / "yulan-mini-shape"))
    from yulan_tune.tiny import build_tiny

    return str(build_tiny())


# --------------------------------------------------------------------------------------------------- benchmark data


def _docstring_summary(docstring: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def code_function_chats(n: int, seed: int = 0, max_lines: int = 120) -> list[list[dict]]:
    """`n` code-writing conversations from the standard library's own functions: the user asks for a function by its
    signature and docstring summary, the assistant answers with its real source. Lengths vary from a few lines to
    `max_lines`, as real chat data does, so padding costs what it costs in practice."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, str, str]] = []  # (signature, summary, source)
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue  # a few stdlib files are not UTF-8 or not parseable by this interpreter: a sample is enough
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
                continue
            docstring = ast.get_docstring(node)
            if not docstring or not 3 <= node.end_lineno - node.lineno + 1 <= max_lines:
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
            signature = f"{node.name}({ast.unparse(node.args)})"
            candidates.append((signature, _docstring_summary(docstring), source))
        if len(candidates) >= 5 * n:
            break
    if len(candidates) < n:
        raise RuntimeError(f"found only {len(candidates)} documented stdlib functions under {stdlib}, need {n}")
    picked = random.Random(seed).sample(candidates, n)
    return [
        [
            {"role": "user", "content": f"Write the Python function `{signature}`: {summary}"},
            {"role": "assistant", "content": f"```python\n{source}\n```"},
        ]
        for signature, summary, source in picked
    ]


def sft_conversations(n: int, seed: int = 0, code_share: float = 0.5, max_lines: int = 120) -> list[list[dict]]:
    """The SFT benchmark set: bundled math conversations (short) mixed with stdlib code conversations (long)."""
    from yulan_tune.data.bundled import math_chat_conversations

    n_code = round(n * code_share)
    rows = math_chat_conversations(n - n_code, seed) + code_function_chats(n_code, seed, max_lines)
    random.Random(seed).shuffle(rows)
    return rows


def _broken_function(source: str, rng: random.Random) -> str:
    """A plausible wrong answer: the function cut after a random share of its body, ending in `pass`."""
    lines = source.split("\n")
    keep = max(1, int(len(lines) * rng.uniform(0.2, 0.6)))
    indent = len(lines[min(1, len(lines) - 1)]) - len(lines[min(1, len(lines) - 1)].lstrip())
    return "\n".join(lines[:keep] + [" " * max(indent, 4) + "pass"])


def preference_rows(n: int, seed: int = 0, code_share: float = 0.5, max_lines: int = 40) -> list[dict]:
    """The DPO benchmark set in trl's conversational prompt / chosen / rejected form: the bundled math pairs (a
    correct vs a plausible wrong worked answer) mixed with code pairs (a stdlib function vs a truncated copy)."""
    from yulan_tune.data.preferences import math_preference_pairs

    n_code = round(n * code_share)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in math_preference_pairs(n - n_code, seed)]
    rng = random.Random(seed)
    for conversation in code_function_chats(n_code, seed + 1, max_lines):
        answer = conversation[1]["content"]
        source = answer.removeprefix("```python\n").removesuffix("\n```")
        rejected = f"```python\n{_broken_function(source, rng)}\n```"
        rows.append({"prompt": conversation[:1], "chosen": [conversation[1]],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[Any], key: str | None = None) -> Path:
    """One JSON object per line; with `key`, each row is wrapped as {key: row}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({key: row} if key else row, ensure_ascii=False) + "\n")
    return path
