"""The benchmark harness measures what it claims: trained tokens per batch and per step, FLOPs, memory windows."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import interleaved_order
from benchmarks.measurement import batch_stats, instrument_trainer, peak_memory, reset_peak_memory
from benchmarks.model_flops import Shape, gqa_exact_training_flops, reference_training_flops
from benchmarks.reporting import append_results, compare


def test_batch_stats_count_padded_padding_free_and_preference_batches():
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]},
            {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]}]
    # hand count: trained = labels other than -100 (a row's first label is never predicted); inputs = real tokens
    padded = batch_stats(DataCollatorForLanguageModeling(pad_token_id=0)(rows))
    assert (padded.trained_tokens, padded.input_tokens, padded.sequence_lengths) == (5, 8, [5, 3])
    flat = batch_stats(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows))
    assert (flat.trained_tokens, flat.input_tokens, flat.sequence_lengths) == (5, 8, [5, 3])

    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
             {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}]
    dpo = batch_stats(DataCollatorForPreference(pad_token_id=0)(pairs))
    # trained = all completion tokens (2 + 1 + 1 + 3); sequences are chosen rows then rejected rows
    assert (dpo.trained_tokens, dpo.input_tokens, dpo.sequence_lengths) == (7, 17, [5, 3, 4, 5])


def _tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=512, attention_bias=True,
                         tie_word_embeddings=False)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def test_instrumented_trainer_credits_each_step_with_the_batch_it_trained(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = np.random.default_rng(0)
    rows = {"input_ids": [], "labels": []}
    for _ in range(24):
        n, prompt = int(rng.integers(6, 40)), int(rng.integers(1, 5))
        ids = rng.integers(3, 512, n).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    model = _tiny_llama()
    seen: list[int] = []  # an independent count: the labels each training forward actually received

    def count_labels(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append(int((kwargs["labels"][..., 1:] != -100).sum()))

    model.register_forward_pre_hook(count_labels, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, report_to="none",
                             save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                      data_collator=DataCollatorForLanguageModeling(pad_token_id=0))
    measurement = instrument_trainer(trainer, "cpu")
    trainer.train()

    assert len(seen) == 5 and len(measurement.clock.wall) == 5
    summary = measurement.summary(warmup_steps=2)
    assert summary["steps_measured"] == 3
    assert summary["trained_tokens"] == sum(seen[2:])
    assert summary["wall_s"] == pytest.approx(measurement.clock.wall[4] - measurement.clock.wall[1])
    assert summary["trained_tokens_per_s"] == pytest.approx(sum(seen[2:]) / summary["wall_s"])


def test_gqa_exact_flops_equal_torch_flop_counter_on_a_training_step():
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny_llama(attn="eager")  # eager attention is plain matmuls, which the counter sees
    ids = torch.randint(0, 512, (1, 64))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    shape = Shape.of(model.config)
    assert gqa_exact_training_flops(shape, [64]) == counter.get_total_flops()
    # the reference formula counts K/V as full h x h projections plus an attention recomputation term
    l, h, f, v, s = 2, 128, 256, 512, 64
    reference = 3 * (8 * s * l * h**2 + 6 * s * l * h * f + 4 * s**2 * l * h) + 4 * s**2 * l * h + 6 * s * h * v
    assert reference_training_flops(shape, [64]) == reference


def test_reference_formula_reproduces_yulan_mini_estimate_for_its_stable_stage():
    # estimate_mfu.py's stable-stage numbers: B = 1008 rows of s = 4096 on the 2.42B shape, per-GPU tokens/s T
    B, s, l, h, f, V = 1008, 4096, 56, 1920, 4800, 99000
    E = 8 * B * s * l * h**2 + 6 * B * s * l * h * f + 4 * B * s**2 * l * h
    F = 3 * E + 4 * B * s**2 * l * h + 6 * B * s * h * V
    shape = Shape(layers=l, hidden=h, intermediate=f, vocab=V, heads=30, kv_heads=6, head_dim=64)
    assert reference_training_flops(shape, [s] * 4) * B / 4 == pytest.approx(F, rel=1e-12)


def test_interleaving_and_results_rows(tmp_path):
    assert interleaved_order(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    results = tmp_path / "RESULTS.md"
    results.write_text("| h |\n| --- |\n| old |\n<!-- rows:x -->\n\n| h |\n<!-- rows:y -->\n")
    append_results("x", ["| new |"], results)
    assert results.read_text().startswith("| h |\n| --- |\n| old |\n| new |\n<!-- rows:x -->\n")
    with pytest.raises(ValueError, match="rows:z"):
        append_results("z", ["| r |"], results)


def test_compare_takes_medians_and_per_repetition_ratios():
    def run(rep, rate, rss):
        return {"rep": rep, "trained_tokens_per_s": rate, "input_tokens_per_s": rate, "wall_s": 1.0,
                "peak_rss_mib": rss, "trained_tokens_per_cpu_s": None}

    runs = {"a": [run(0, 300, 100), run(1, 100, 100), run(2, 200, 90)],
            "b": [run(0, 100, 200), run(1, 100, 100), run(2, 50, 100)]}
    summary = compare(runs, "a", "b")
    assert summary["a"]["trained_tokens_per_s"] == 200 and summary["b"]["trained_tokens_per_s"] == 100
    assert summary["tokens_per_s_ratio"] == {"median": 3.0, "min": 1.0, "max": 4.0}
    assert summary["memory_ratio"]["median"] == 0.9


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_window_starts_at_reset():
    reset_peak_memory("cpu")
    before = peak_memory("cpu")["peak_rss_mib"]
    # a fresh anonymous mapping, every page written: torch or malloc could reuse pages freed by earlier tests,
    # which would not raise the resident set at all
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    block.close()
    after_alloc = peak_memory("cpu")["peak_rss_mib"]
    assert after_alloc >= before + 60
    reset_peak_memory("cpu")
    assert peak_memory("cpu")["peak_rss_mib"] < after_alloc - 60


def test_benchmarks_start_from_shipped_recipe_configs():
    """Each side of a comparison starts from a config the project ships (a missing one silently fell back before)."""
    from benchmarks import dpo_throughput
    from benchmarks.models_and_data import RECIPE_CONFIGS

    for name in (dpo_throughput.GPU_RECIPE_CONFIG, dpo_throughput.CPU_RECIPE_CONFIG):
        assert (RECIPE_CONFIGS / name).is_file(), name
