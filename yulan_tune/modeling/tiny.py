"""The embedded default: a tiny YuLan built locally and deterministically, so everything runs offline on a CPU.

Tokenizer: byte-level BPE trained on the bundled corpus, with YuLan-Mini's special tokens at YuLan-Mini's ids
(yulan_reference.md section 6). Model: a Llama with the released YuLan-Mini's features (q/k/v bias, GQA 5:1,
untied head, rope theta 490000, head_dim 64) at CPU width. Every hidden and intermediate size is a multiple of 64
(bitsandbytes' 4-bit blocksize, stack_notes.md); YuLan's FFN ratio of 2.5 would give 800 at width 320, so the
tiny model uses 832 (2.6x), the nearest multiple of 64.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from yulan_tune.data.corpus import bundled_corpus
from yulan_tune.loading import DEFAULT_CHAT_TEMPLATE
from yulan_tune.paths import cache_home

TINY_SHAPE = dict(
    hidden_size=320,
    num_hidden_layers=4,
    num_attention_heads=5,
    num_key_value_heads=1,  # GQA 5:1 as YuLan-Mini (30:6)
    head_dim=64,
    intermediate_size=832,
    vocab_size=4096,
)
# YuLan-Mini's special tokens at YuLan-Mini's ids; 3..101 are reserved fillers so that pad lands on 102.
SPECIAL_TOKENS = (
    ["<unk>", "<s>", "</s>"]
    + [f"<|reserved_{i}|>" for i in range(3, 102)]
    + ["<pad>", "<reasoning_step>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
)
# Llama-3's pre-tokenizer split: with GPT-2's regex "<|end_header_id|>\n\n" tokenizes differently before text than
# alone, which breaks prompt/completion boundaries (stack_notes.md).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_PRETRAIN_STEPS = 80
FORMAT_VERSION = "4"  # bump when the build or its numerics change, so stale caches are rebuilt


def default_tiny_dir() -> Path:
    return cache_home() / f"tiny-yulan-v{FORMAT_VERSION}"


def build_tiny_tokenizer(out_dir: str | os.PathLike | None = None, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (deterministic for a given corpus) and optionally save it to `out_dir`."""
    texts = texts if texts is not None else bundled_corpus()
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SHAPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):  # the ids are the contract; fail loudly if tokenizers changes this
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    # YuLan-Mini's tokenizer adds BOS and no EOS (add_bos_token: true, add_eos_token: false; reference section 6)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[102:],
        chat_template=DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8"),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        **TINY_SHAPE,
        hidden_act="silu",
        attention_bias=True,  # q/k/v bias as YuLan-Mini (Llama adds an o_proj bias too; zeroed at conversion)
        mlp_bias=False,
        rms_norm_eps=1e-6,
        rope_theta=490000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )


def build_tiny(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    pretrain_steps: int | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the tiny YuLan in Llama form: tokenizer + briefly pretrained model. Returns its directory.

    Pretraining runs `PretrainRecipe` on a tiny yulanmini (the real path), converts it with `to_llama`, and keeps
    the yulanmini form under `<dir>/yulanmini`.

    The result is cached: a directory that already holds a complete build (`tiny_build.json`) is returned as is
    unless `force`. Written to a temporary directory first and renamed, so an interrupted build leaves nothing.
    """
    out = Path(out_dir) if out_dir is not None else default_tiny_dir()
    steps = DEFAULT_PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    marker = out / "tiny_build.json"
    if marker.exists() and not force:
        return out
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = build_tiny_tokenizer(staging, bundled_corpus(seed=seed))
        if steps:
            # The real path: a tiny yulanmini pretrained by PretrainRecipe (muP, WeSaR, z-loss, WSD), then to_llama.
            from yulan_tune.pretrain import pretrain_tiny_base

            pretrain_tiny_base(staging, staging, steps=steps, seed=seed)
            # keep the yulanmini form (to continue pretraining or anneal from), drop the run's data and checkpoints
            run = staging / "pretrain"
            if (run / "run" / "final").is_dir():
                (run / "run" / "final").rename(staging / "yulanmini")
            shutil.rmtree(run, ignore_errors=True)
        else:  # untrained: for tests that only need the shapes and the tokenizer
            model = LlamaForCausalLM(tiny_llama_config(tokenizer))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
            model.save_pretrained(str(staging))
        (staging / "tiny_build.json").write_text(json.dumps(
            {"seed": seed, "pretrain_steps": steps, "format": FORMAT_VERSION}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def tiny_main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="yulan-tune tiny", description="Build the offline tiny YuLan.")
    parser.add_argument("--out", default=None, help=f"output dir (default: {default_tiny_dir()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if the dir holds a complete build")
    args = parser.parse_args(argv)
    out = build_tiny(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps, force=args.force)
    print(f"tiny: {out}")
    return 0
