"""`yulan-tune export`: GGUF files read back by readers we did not write (transformers' `gguf_file=` loading, gguf's
GGUFReader, llama.cpp through llama-cpp-python) agree with the source model and tokenizer; `--to hf` gives a plain
Llama directory; adapters are merged and yulanmini checkpoints folded first.

Thresholds are the issue's (f32 logits within 1e-4, q8_0 top-1 agreement >= 99%, identical tokens), never numbers
of the tiny model's training.
"""

from __future__ import annotations

import inspect
import json
import random
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from yulan_tune.cli import main as cli_main
from yulan_tune.console import DEBUG_ENV
from yulan_tune.export.gguf import GGUF_DTYPES, gguf_vocab, permute_for_rope, write_gguf
from yulan_tune.export.hf import load_for_export, merge_adapter, write_adapter_info
from yulan_tune.export.ollama import MODELFILE


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


# ------------------------------------------------------------------------------------------------ probe strings

_WORDS = ("the cat sat on a mat while it's raining; we'll see, they've gone, I'm here, you'd THINK so. "
          "Numbers 1234567 and 3.14159, dates 2024-12-31, emails a.b@c.org, URLs https://x.io/a?b=c#d").split()
_UNICODE = ["你好，世界", "玉兰小模型", "数学题：三加五等于八。", "こんにちは世界", "Привет, мир", "مرحبا بالعالم",
            "café naïve résumé", "Ünïcödé Ωmega ß", "emoji 😀🚀🎉👍🏽", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301 combining", "zero\u200bwidth",
            "한국어 텍스트", "ελληνικά", "עברית", "ไทย", "∑∫√∞≠≤", "«quotes» „low“ ‘single’", "\u00a0nbsp\u3000ideo"]
_SPACES = [" ", "  ", "\t", "\n", "\n\n", " \n", "\r\n", "   ", "\n  ", ""]


def _code_snippets() -> list[str]:
    """Real Python source (indentation, operators, docstrings) from modules that ship with Python."""
    import argparse
    import json as json_module
    import textwrap as textwrap_module

    lines = []
    for module in (argparse, json_module.decoder, textwrap_module):
        lines += inspect.getsource(module).splitlines(keepends=True)
    return ["".join(lines[i:i + 6]) for i in range(0, len(lines) - 6, 5)]


def probe_strings(tokenizer, count: int = 1000, seed: int = 0) -> list[str]:
    """`count` strings: a quarter each ASCII, unicode, code and rendered chat conversations."""
    rng = random.Random(seed)
    quarter = count // 4
    ascii_texts = ["".join(rng.choice(_WORDS) + rng.choice(_SPACES + [" "] * 8) for _ in range(rng.randint(1, 30)))
                   for _ in range(quarter)]
    unicode_texts = ["".join(rng.choice(_UNICODE + _WORDS) + rng.choice(_SPACES + [" "] * 4)
                             for _ in range(rng.randint(1, 12))) for _ in range(quarter)]
    code = _code_snippets()
    code_texts = [rng.choice(code) for _ in range(quarter)]
    chats = []
    for _ in range(count - 3 * quarter):
        messages = [{"role": "system", "content": "You are YuLan-Mini, a helpful assistant."}] if rng.random() < .5 else []
        for turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(ascii_texts + unicode_texts).strip() or "hi"})
            if turn < 2 or rng.random() < .5:
                messages.append({"role": "assistant", "content": rng.choice(ascii_texts + code_texts).strip() or "ok"})
        prompt = messages[-1]["role"] == "user"
        chats.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))
    return ascii_texts + unicode_texts + code_texts + chats


def probe_batch(tokenizer, rows: int = 24, length: int = 128) -> torch.Tensor:
    """Real text (all four kinds) cut into `rows` sequences of `length` tokens, for logit comparisons."""
    ids = [i for text in probe_strings(tokenizer, 400, seed=1) for i in tokenizer(text).input_ids]
    assert len(ids) >= rows * length
    return torch.tensor(ids[: rows * length]).view(rows, length)


# ------------------------------------------------------------------------------------------------ helpers


def load_gguf_model(path: Path) -> LlamaForCausalLM:
    """transformers' own GGUF loading (dequantizing). Its Llama mapping has no key for the q/k/v biases, which the
    file has as tensors (attn_q.bias ...); the flag tells it to create them."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, attention_bias=True,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def source(tiny_dir):
    model, tokenizer, kind = load_for_export(tiny_dir, dtype=torch.float32)
    assert kind == "llama"
    return model, tokenizer


@pytest.fixture(scope="module")
def gguf_files(source, tmp_path_factory):
    model, tokenizer = source
    root = tmp_path_factory.mktemp("gguf")
    return {dtype: Path(write_gguf(model, tokenizer, root / f"tiny-{dtype}.gguf", dtype=dtype,
                                   show_progress=False)["path"]) for dtype in GGUF_DTYPES}


@torch.no_grad()
def logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).logits.float()


# ------------------------------------------------------------------------------------------------ weights


def test_permutation_is_llama_cpps_interleaved_rope_order():
    """Rows of one head [a0 a1 | b0 b1] (rotate-half pairs (a_i, b_i)) become [a0 b0 a1 b1], per head."""
    rows = np.arange(8, dtype=np.float32)  # 2 heads of head_dim 4
    assert permute_for_rope(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    weight = np.arange(16, dtype=np.float32).reshape(8, 2)
    assert permute_for_rope(weight, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_gguf_metadata_and_tensors(source, gguf_files):
    model, tokenizer = source
    config = model.config
    reader = gguf.GGUFReader(str(gguf_files["f32"]))

    def field(key):
        value = reader.get_field(key)
        assert value is not None, key
        return value.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.context_length") == config.max_position_embeddings
    assert field("llama.attention.head_count") == config.num_attention_heads
    assert field("llama.attention.head_count_kv") == config.num_key_value_heads
    assert field("llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field("llama.rope.dimension_count") == config.head_dim
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert field("tokenizer.ggml.add_bos_token") is True
    assert "{% generation" not in field("tokenizer.chat_template") and "<|eot_id|>" in field("tokenizer.chat_template")
    names = {tensor.name for tensor in reader.tensors}
    for i in range(config.num_hidden_layers):
        assert {f"blk.{i}.attn_q.bias", f"blk.{i}.attn_k.bias", f"blk.{i}.attn_v.bias"} <= names
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= names  # untied head written
    q8 = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(str(gguf_files["q8_0"])).tensors}
    assert q8["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_q.bias"] == q8["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_f32_gguf_logits_equal_the_source(source, gguf_files):
    model, tokenizer = source
    batch = probe_batch(tokenizer)
    reference = logits(model, batch)
    difference = (logits(load_gguf_model(gguf_files["f32"]), batch) - reference).abs().max().item()
    print(f"f32 GGUF via transformers: max |logit difference| {difference:.3g} on {batch.numel()} positions")
    assert difference <= 1e-4


def test_q8_0_top1_agreement(source, gguf_files):
    model, tokenizer = source
    batch = probe_batch(tokenizer)
    reference = logits(model, batch).argmax(-1)
    for dtype, minimum in (("q8_0", 0.99), ("f16", 0.99), ("bf16", 0.98)):
        agreement = (logits(load_gguf_model(gguf_files[dtype]), batch).argmax(-1) == reference).float().mean().item()
        print(f"{dtype} GGUF via transformers: top-1 agreement {agreement:.4f} on {batch.numel()} positions")
        assert agreement >= minimum, dtype


# ------------------------------------------------------------------------------------------------ tokenizer


def test_gguf_tokenizer_equals_the_source_tokenizer(source, gguf_files):
    _, tokenizer = source
    path = gguf_files["f32"]
    from_gguf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strings = probe_strings(tokenizer)
    assert len(strings) == 1000
    mismatches = [s for s in strings if tokenizer(s, add_special_tokens=False).input_ids
                  != from_gguf(s, add_special_tokens=False).input_ids]
    print(f"GGUF tokenizer via transformers: {len(strings) - len(mismatches)}/{len(strings)} strings equal")
    assert not mismatches, mismatches[:3]
    assert from_gguf("hi").input_ids == tokenizer("hi").input_ids  # BOS added as by the source


def test_sentencepiece_style_tokenizer_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["a small sentencepiece style corpus"] * 4,
                                trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"],
                                                    show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(NotImplementedError, match="SentencePiece-style BPE"):
        gguf_vocab(sp, 4096)
    model_dir = tmp_path / "sp-model"
    shutil.copytree(tiny_dir, model_dir, ignore=shutil.ignore_patterns("tokenizer*", "yulanmini", "chat_template*"))
    sp.save_pretrained(model_dir)
    assert cli_main(["export", str(model_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "SentencePiece-style BPE" in err[0], err


# ------------------------------------------------------------------------------------------------ sources and CLI


def test_yulanmini_checkpoint_exports_as_its_llama_form(tiny_dir, gguf_files, tmp_path):
    """The tiny build keeps its yulanmini form; folded at export, it gives the same tensors as the Llama form."""
    out = tmp_path / "from-yulanmini.gguf"
    assert cli_main(["export", str(tiny_dir / "yulanmini"), "--to", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    reference = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(gguf_files["f32"])).tensors}
    assert ours.keys() == reference.keys()
    worst = max(float(np.abs(ours[name] - reference[name]).max()) for name in ours)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with a non-zero update (an unmerged export would show), and its PeftModel."""
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    peft_model = get_peft_model(base, lora).eval()
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(path))
    return path, peft_model


def test_adapter_exports_merged(adapter, source, tmp_path, capsys):
    adapter_dir, peft_model = adapter
    out = tmp_path / "merged.gguf"
    assert cli_main(["export", str(adapter_dir), "--to", "gguf", "--dtype", "f32", "--out", str(out), "--ollama"]) == 0
    assert "adapter merged into its base" in capsys.readouterr().out
    batch = probe_batch(source[1], rows=4)
    merged = logits(load_gguf_model(out), batch)
    assert (merged - logits(peft_model, batch)).abs().max().item() <= 1e-4
    with peft_model.disable_adapter():
        assert (merged - logits(peft_model, batch)).abs().max().item() > 1e-3  # the update is really in there
    modelfile = (tmp_path / MODELFILE).read_text()
    assert modelfile.startswith("FROM ./merged.gguf\n")
    assert 'TEMPLATE """' in modelfile and "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_qlora_adapter_is_merged_into_the_dequantized_base(adapter, tiny_dir, tmp_path):
    """An adapter recorded as trained on a 4-bit base goes onto the dequantized NF4 weights, as `merge` does."""
    adapter_dir = tmp_path / "qlora"
    shutil.copytree(adapter[0], adapter_dir)
    write_adapter_info(adapter_dir, str(tiny_dir), "4bit")
    out = tmp_path / "hf"
    assert cli_main(["export", str(adapter_dir), "--to", "hf", "--dtype", "f32", "--out", str(out)]) == 0
    exported = load_file(out / "model.safetensors")
    dequantized = load_file(merge_adapter(adapter_dir, tmp_path / "merge", dtype=torch.float32) / "model.safetensors")
    plain = load_file(merge_adapter(adapter_dir, tmp_path / "plain", dtype=torch.float32, dequantize=False)
                      / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"  # no LoRA there: only the NF4 round trip changes it
    assert torch.equal(exported[name], dequantized[name]) and not torch.equal(exported[name], plain[name])


def test_to_hf_writes_a_plain_llama_dir(tiny_dir, source, tmp_path):
    out = tmp_path / "hf"
    assert cli_main(["export", str(tiny_dir / "yulanmini"), "--to", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model, tokenizer = source
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    batch = probe_batch(tokenizer, rows=4)
    assert (logits(loaded, batch) - logits(model, batch)).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--to", "gguf", "--out", "{tmp}/m.gguf"], "no such directory"),
    (["{tiny}", "--to", "hf", "--out", "{tmp}/hf", "--dtype", "q8_0"], "--dtype for --to hf"),
    (["{tiny}", "--to", "gguf", "--out", "{tmp}/m.gguf", "--dtype", "q4"], "--dtype for --to gguf"),
    (["{tiny}", "--to", "hf", "--out", "{tmp}/hf", "--ollama"], "--ollama goes with --to gguf"),
    (["{tmp}", "--to", "gguf", "--out", "{tmp}/m.gguf"], "neither a model directory"),
])
def test_user_errors_are_one_line(argv, message, tiny_dir, tmp_path, capsys):
    values = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path), "tiny": str(tiny_dir)}
    assert cli_main(["export", *(arg.format(**values) for arg in argv)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("yulan-tune export: error: ") and message in err[0], err


# ------------------------------------------------------------------------------------------------ llama.cpp


@pytest.mark.slow
def test_llama_cpp_loads_the_gguf_and_generates_as_transformers(source, gguf_files):
    """llama.cpp itself (llama-cpp-python, `make test-slow` installs it): the same tokens for the probe strings,
    close logits, and the same greedy generations as transformers for the same prompts."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-slow builds it)")
    model, tokenizer = source
    path = gguf_files["f32"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=1, logits_all=True, verbose=False, seed=0)

    strings = probe_strings(tokenizer)
    mismatches = [s for s in strings if llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
                  != tokenizer(s, add_special_tokens=False).input_ids]
    print(f"llama.cpp tokenizer: {len(strings) - len(mismatches)}/{len(strings)} strings equal")
    assert not mismatches, mismatches[:3]

    row = probe_batch(tokenizer, rows=1, length=256)[0].tolist()
    llm.reset()
    llm.eval(row)
    ours = torch.tensor(np.array(llm.scores[: len(row)]))
    reference = logits(model, torch.tensor([row]))[0]
    difference = (ours - reference).abs().max().item()
    print(f"llama.cpp f32 logits: max |difference| {difference:.3g} (max |logit| {reference.abs().max():.3g})")
    assert difference <= 2e-3 * max(1.0, reference.abs().max().item())
    quantized = llama_cpp.Llama(model_path=str(gguf_files["q8_0"]), n_ctx=1024, n_threads=1, logits_all=True,
                                verbose=False)
    quantized.eval(row)
    agreement = (torch.tensor(np.array(quantized.scores[: len(row)])).argmax(-1) == reference.argmax(-1)).float()
    print(f"llama.cpp q8_0: top-1 agreement {agreement.mean():.4f} on {len(row)} positions")
    assert agreement.mean() >= 0.99

    # the GGUF's chat template renders in a Jinja engine other than transformers' (llama-cpp-python's jinja2)
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token,
                                                                bos_token=tokenizer.bos_token)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"}]
    assert formatter(messages=conversation).prompt == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)

    eog = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    vocab = llm._model.vocab
    assert all(llama_cpp.llama_vocab_is_eog(vocab, token) for token in eog)  # llama.cpp stops where transformers does
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("What is 3 + 5?", "Write a Python function that adds two numbers.", "你好")]
    prompts += ["def fibonacci(n):", "The answer to 12 * 7 is"]
    generated = 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=not prompt.startswith(tokenizer.bos_token)).input_ids
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        cpp = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            cpp.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(cpp) == 24:
                break
        hf = hf[: hf.index(next(t for t in hf if t in eog)) + 1] if any(t in eog for t in hf) else hf
        assert cpp == hf, (prompt, cpp, hf)
        generated += len(cpp)
    print(f"llama.cpp greedy generations: {len(prompts)}/{len(prompts)} prompts equal ({generated} tokens)")
