"""The embedded default: a tiny YuLan built locally and deterministically, so everything runs offline on a CPU, and
the one resolver of the name "tiny".

Tokenizer: byte-level BPE trained on the bundled corpus, with YuLan-Mini's special tokens at YuLan-Mini's ids
(docs/yulan_reference.md section 6). Model: a Llama with the released YuLan-Mini's features (q/k/v bias, GQA 5:1,
untied head, rope theta 490000, head_dim 64) at CPU width, pretrained in the yulanmini form by `PretrainRecipe`
(muP, WeSaR, z-loss, WSD) and converted with `to_llama`. Every hidden and intermediate size is a multiple of 64
(bitsandbytes' 4-bit blocksize, docs/stack_notes.md); YuLan's FFN ratio of 2.5 would give 800 at width 320, so the
tiny model uses 832 (2.6x), the nearest multiple of 64.

`resolve_tiny("tiny", kind)` gives the directory of each kind of tiny artefact, built on first use and cached under
`$YULAN_TUNE_HOME` in a directory named by a hash of its build settings, so a changed build never reuses a stale
cache: "model" (Llama form + tokenizer, the quickstart's base), "tokenizer", "pre_annealing" (a stable-phase
yulanmini checkpoint with its AdamW state, to anneal from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from yulan_tune.console import quiet_logging
from yulan_tune.conventions import YULAN_SPECIAL_TOKENS
from yulan_tune.data.bundled import CORPUS, bundled_corpus, prepare_bundled_corpus
from yulan_tune.data.chat import end_of_turn_ids
from yulan_tune.data.curriculum import load_curriculum
from yulan_tune.data.mixture import largest_remainder
from yulan_tune.data.sources import pack_source
from yulan_tune.modeling.convert import to_llama
from yulan_tune.paths import DEFAULT_CHAT_TEMPLATE, PRETRAIN_DIR, cache_home

TINY = "tiny"
TinyKind = Literal["model", "tokenizer", "pre_annealing"]
TINY_SHAPE = dict(
    hidden_size=320,
    num_hidden_layers=4,
    num_attention_heads=5,
    num_key_value_heads=1,  # GQA 5:1 as YuLan-Mini (30:6)
    head_dim=64,
    intermediate_size=832,
    vocab_size=4096,
)
TINY_CURRICULUM = PRETRAIN_DIR / "curriculum" / "tiny.yaml"  # the tests' default curriculum
# Llama-3's pre-tokenizer split: with GPT-2's regex "<|end_header_id|>\n\n" tokenizes differently before text than
# alone, which breaks prompt/completion boundaries (docs/stack_notes.md).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class TinyPretraining:
    """How `build_tiny` pretrains the quickstart's base; every field is part of the build's cache key.

    The defaults build in about 90 s on 2 idle cores: 320 updates of 4 rows at YuLan-Mini's peak LR scaled by muP,
    WSD with a short warmup and a 1/5 decay, on the bundled corpus in the phases of pretrain/curriculum/tiny.yaml.
    320 and not 80 updates: with 80 the model does not learn to copy the operands of a question into its answer,
    and no SFT fixes that. docs/tiny_model.md has the other settings tried (issue 13) and what each gave.
    """

    steps: int = 320
    batch_size: int = 4  # rows of the curriculum's seq_len per update
    learning_rate: float = 1e-2
    dim_model_base_lr: int = 64  # muP: the width the learning rate was tuned at
    warmup_fraction: float = 1 / 15
    decay_fraction: float = 1 / 5
    end_lr_factor: float = 0.1
    math_docs: int = 2000  # generated worked problems (train split) in the corpus
    curriculum: str = "tiny"  # pretrain/curriculum/<name>.yaml, or a curriculum file's path
    # bf16 autocast over fp32 master weights: 2x faster on a CPU with bf16 units (AVX512-BF16 / AMX), emulated and
    # slower without them; off by default so that every machine builds the same base (docs/tiny_model.md)
    bf16: bool = False


DEFAULT_PRETRAINING = TinyPretraining()
BUILD_VERSION = "6"  # bump when the build's code changes in a way its settings below do not capture
# the tiny pre-annealing checkpoint: YuLan-Mini's stable-phase peak LR (docs/yulan_reference.md 3.1), and the 4K
# stage's RoPE base (1.1), so that the anneal's ABF switch to 490000 is a real switch
TINY_STABLE_STEPS = 60
TINY_STABLE_LR = 1e-2
TINY_STABLE_ROPE_THETA = 10000.0
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size")


def resolve_tiny(name_or_path: str, kind: TinyKind) -> str:
    """"tiny" -> the directory of the tiny artefact of `kind` (built on first use); anything else unchanged."""
    if name_or_path != TINY:
        return name_or_path
    builders = {"model": build_tiny, "tokenizer": tiny_tokenizer, "pre_annealing": tiny_pre_annealing}
    return str(builders[kind]())


def tiny_curriculum(name: str = "tiny") -> Path:
    """A shipped curriculum by name (pretrain/curriculum/<name>.yaml), or a curriculum YAML file given by its path
    (how an experiment tries another mix; its content, not its path, goes into the build's cache key)."""
    if name.endswith((".yaml", ".yml", ".json")):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such curriculum file")
        return path
    return PRETRAIN_DIR / "curriculum" / f"{name}.yaml"


def _settings_key(name: str, settings: dict[str, Any], curriculum: str = "tiny") -> Path:
    """`$YULAN_TUNE_HOME/<name>-<hash of the settings>`: a build with other settings lives in another directory."""
    text = json.dumps({**settings, "version": BUILD_VERSION, "shape": TINY_SHAPE,
                       "curriculum": hashlib.sha256(tiny_curriculum(curriculum).read_bytes()).hexdigest()},
                      sort_keys=True)
    return cache_home() / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------------ tokenizer


def build_tiny_tokenizer(out_dir: str | os.PathLike | None = None, texts: list[str] | None = None
                         ) -> PreTrainedTokenizerFast:
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
        special_tokens=YULAN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(YULAN_SPECIAL_TOKENS):  # the ids are the contract; fail loudly if tokenizers changes
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
        additional_special_tokens=YULAN_SPECIAL_TOKENS[102:],
        chat_template=DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8"),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def tiny_tokenizer(out_dir: str | os.PathLike | None = None) -> Path:
    """The tiny tokenizer's directory (cached unless `out_dir`), built on first use."""
    out = Path(out_dir) if out_dir is not None else _settings_key("tiny-tokenizer", {})
    if not (out / "tokenizer.json").is_file():
        with _staging(out) as staging:
            build_tiny_tokenizer(staging)
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary sibling directory renamed to `out` on success, so an interrupted build leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ model


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


def default_tiny_dir(seed: int = 0, pretraining: TinyPretraining = DEFAULT_PRETRAINING) -> Path:
    settings = dataclasses.asdict(pretraining)
    if not settings["bf16"]:  # the field came after the fp32 builds: they keep the cache key they had
        del settings["bf16"]
    return _settings_key("tiny-yulan", {"seed": seed, "pretraining": settings}, pretraining.curriculum)


def build_tiny(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    pretrain_steps: int | None = None,
    pretraining: TinyPretraining = DEFAULT_PRETRAINING,
    force: bool = False,
) -> Path:
    """Build (or reuse) the tiny YuLan in Llama form: tokenizer + briefly pretrained model. Returns its directory.

    Pretraining runs `PretrainRecipe` on a tiny yulanmini (the real path), converts it with `to_llama`, and keeps
    the yulanmini form under `<dir>/yulanmini`. A directory that already holds a complete build (`tiny_build.json`)
    is returned as is unless `force`; the default directory is named by the build settings.
    """
    if pretrain_steps is not None:
        pretraining = dataclasses.replace(pretraining, steps=pretrain_steps)
    steps = pretraining.steps
    out = Path(out_dir) if out_dir is not None else default_tiny_dir(seed, pretraining)
    if (out / "tiny_build.json").exists() and not force:
        return out
    torch.manual_seed(seed)
    with _staging(out) as staging:
        tokenizer = build_tiny_tokenizer(staging, bundled_corpus(seed=seed))
        if steps:
            pretrain_tiny_base(staging, staging, pretraining, seed=seed)
            # keep the yulanmini form (to continue pretraining or anneal from), drop the run's data and checkpoints
            run = staging / "pretrain"
            if (run / "run" / "final").is_dir():
                (run / "run" / "final").rename(staging / "yulanmini")
            shutil.rmtree(run, ignore_errors=True)
        else:  # untrained: for tests that only need the shapes and the tokenizer
            model = LlamaForCausalLM(tiny_llama_config(tokenizer))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
            model.save_pretrained(str(staging))
        (staging / "tiny_build.json").write_text(json.dumps(
            {"seed": seed, "pretraining": dataclasses.asdict(pretraining), "version": BUILD_VERSION}, indent=2))
    return out


def pretrain_tiny_base(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                       pretraining: TinyPretraining = DEFAULT_PRETRAINING, *, seed: int = 0) -> Path:
    """Pretrain the quickstart's tiny YuLan with `PretrainRecipe` and write it to `out_dir` in Llama form (+ tokenizer).

    A yulanmini model of TINY_SHAPE (muP init, z-loss, WSD with a short warmup and a cos2 decay) trains
    `pretraining.steps` steps on the bundled corpus in the phases of its curriculum, scaled to that many steps; then
    `to_llama`. The run's files stay in `out_dir/pretrain`.
    """
    # imported here, not at the top: resolving an already-built "tiny" (every command that takes a model) must not
    # pay for the training stack's imports (Trainer, peft, bitsandbytes: ~1 s; benchmarks/eval_throughput.py)
    from yulan_tune.pretrain import PretrainConfig, PretrainRecipe
    out = Path(out_dir)
    work = out / "pretrain"
    tiny = load_curriculum(tiny_curriculum(pretraining.curriculum))
    seq_len, batch, steps = tiny.seq_len, pretraining.batch_size, pretraining.steps
    if steps < len(tiny.phases):
        raise ValueError(f"steps must be >= {len(tiny.phases)} (one per curriculum phase), got {steps}")
    # the tiny curriculum scaled to exactly `steps`: each phase keeps its share of the steps and its mix
    phase_steps = largest_remainder(steps, {p.name: p.total_tokens for p in tiny.phases}, minimum=1)
    rows = {phase.name: largest_remainder(phase_steps[phase.name] * batch, phase.tokens) for phase in tiny.phases}
    work.mkdir(parents=True, exist_ok=True)
    scaled = {"seq_len": seq_len, "phases": [
        {"name": name, "tokens": {source: n * seq_len for source, n in phase_rows.items()}}
        for name, phase_rows in rows.items()]}
    curriculum_file = work / "curriculum.yaml"
    curriculum_file.write_text(json.dumps(scaled, indent=1))  # JSON is valid YAML
    # tokenize only what the run can use: a stdlib source is ~3.4K tokens (~13 rows of 256), and a step of the
    # default reads ~2.75 stdlib rows, so steps // 2 sources leave ~2.5x to choose from. (Which documents the model
    # sees moves its quickstart score by several points, docs/tiny_model.md, so this rule is part of the build.)
    stdlib_docs = min(400, max(8, steps // 2))
    shape = {key: TINY_SHAPE[key] for key in _SHAPE_KEYS}
    with quiet_logging():
        prepare_bundled_corpus(work / "data", tokenizer_dir, seq_len=seq_len, stdlib_docs=stdlib_docs,
                               math_train=pretraining.math_docs, seed=seed)
        config = PretrainConfig(
            output_dir=str(work / "run"), curriculum=str(curriculum_file), data_root=str(work / "data"),
            tokenizer=str(tokenizer_dir), seq_len=seq_len, seed=seed,
            model_config={**shape, "dim_model_base_lr": pretraining.dim_model_base_lr,
                          "vocab_size": TINY_SHAPE["vocab_size"],
                          "rope_parameters": {"rope_type": "default", "rope_theta": 490000.0},
                          "max_position_embeddings": 4096},
            per_device_train_batch_size=batch, learning_rate=pretraining.learning_rate,
            warmup_steps=max(round(steps * pretraining.warmup_fraction), 1),
            decay_steps=max(round(steps * pretraining.decay_fraction), 1), decay_shape="cos2",
            end_lr_factor=pretraining.end_lr_factor, bf16=pretraining.bf16,
            save_steps=10**9, keep_last_checkpoints=1, monitor_every_steps=max(steps // 5, 1),
            logging_steps=max(steps // 20, 1), report_to="none", export_llama=False,
            use_cpu=not torch.cuda.is_available(),
        )
        result = PretrainRecipe(config, description="building the tiny YuLan").run()
    llama = to_llama(Path(result["final"]), None, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    llama.generation_config.pad_token_id = tokenizer.pad_token_id
    llama.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    llama.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ pre-annealing


def tiny_pre_annealing(out_dir: str | os.PathLike | None = None, *, tokenizer_dir: str | os.PathLike | None = None,
                       corpus: str = CORPUS, steps: int = TINY_STABLE_STEPS, lr: float = TINY_STABLE_LR,
                       seq_len: int = 256, batch_size: int = 8, seed: int = 0, force: bool = False,
                       **model_config: Any) -> Path:
    """A tiny stable-phase checkpoint to anneal from, built on first use by our own pretraining recipe
    (`PretrainRecipe`: a yulanmini of the tiny YuLan's shape from a muP init, muP AdamW, z-loss, a short warmup and
    then a constant LR, no decay) on `corpus`; returns its last `checkpoint-N` (weights, optimizer state, tokenizer).
    Cached under $YULAN_TUNE_HOME unless `out_dir`. `tokenizer_dir`: the tiny tokenizer (default: trained here);
    `model_config`: overrides of the tiny shape (tests use a narrower model)."""
    settings = {"corpus": corpus, "steps": steps, "lr": lr, "seq_len": seq_len, "batch_size": batch_size,
                "seed": seed, "model_config": model_config}
    # imported here for the reason given in pretrain_tiny_base
    from yulan_tune.pretrain import PretrainConfig, PretrainRecipe
    from yulan_tune.training.checkpoints import latest_complete_checkpoint

    root = Path(out_dir) if out_dir is not None else _settings_key("tiny-pre-annealing", settings)
    run_dir = root / "run"
    checkpoint_dir = run_dir / f"checkpoint-{steps}"
    if latest_complete_checkpoint(run_dir) == checkpoint_dir and not force:
        return checkpoint_dir
    if force:
        shutil.rmtree(run_dir, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else tiny_tokenizer(root / "tokenizer")
    packed = pack_source(corpus, tokenizer_dir, seq_len, cache_root=root / "packed")
    curriculum = root / "curriculum.yaml"  # one stable phase of exactly `steps` steps; JSON is valid YAML
    curriculum.write_text(json.dumps({"seq_len": seq_len, "datasets": {"stable": str(packed.path)},
                                      "phases": [{"name": "stable", "tokens": {"stable": steps * batch_size * seq_len}}]}))
    shape = {key: TINY_SHAPE[key] for key in _SHAPE_KEYS}
    config = PretrainConfig(
        output_dir=str(run_dir), curriculum=str(curriculum), tokenizer=str(tokenizer_dir), seq_len=seq_len, seed=seed,
        model_config={**shape, "rope_parameters": {"rope_type": "default", "rope_theta": TINY_STABLE_ROPE_THETA},
                      "max_position_embeddings": 4096, **model_config},
        per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=max(steps // 6, 1), decay_steps=0,
        save_steps=steps, keep_last_checkpoints=1, monitor_every_steps=0, logging_steps=max(steps // 6, 1),
        report_to="none", export_llama=False, use_cpu=not torch.cuda.is_available(),
    )
    with quiet_logging():
        PretrainRecipe(config, description="building the tiny pre-annealing checkpoint").run()
    return checkpoint_dir
