"""SFT end to end on the tiny YuLan: full, LoRA + merge, QLoRA (+ the CPU 4-bit trap), 2-process DDP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from yulan_tune.conventions import IGNORE_INDEX
from yulan_tune.export import merge_adapter
from yulan_tune.loading import load_model
from yulan_tune.paths import REPO_ROOT
from yulan_tune.sft import SFTRecipe, parse_config
from yulan_tune.training.callbacks import LoraGradientGuard, converted_for_cpu_inference

CONFIGS = REPO_ROOT / "recipes" / "configs"


def quick_config(name: str, tiny_dir: Path, out: Path, *extra: str):
    # 2 rows per update, not the configs' 8: on 2 cores six LoRA updates took 3.4 s instead of 16.5 (QLoRA 6 s
    # instead of 25.5), and the first-to-last loss drop was as clear (seeds 0-4: 0.39-0.49, LoRA and QLoRA alike;
    # 0.42 with 8 rows, seed 0)
    return parse_config(
        ["--config", str(CONFIGS / name), "--model_name_or_path", str(tiny_dir), "--output_dir", str(out),
         "--num_bundled_examples", "200", "--max_steps", "6", "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--disable_tqdm", "true", *extra]
    )


def logged_losses(recipe: SFTRecipe) -> list[float]:
    return [entry["loss"] for entry in recipe.trainer.state.log_history if "loss" in entry]


def test_full_sft_lowers_loss_and_masks_prompts(tiny_dir, tmp_path):
    # six updates of 8 rows with a warmup (the quickstart's own 2-row, no-warmup schedule is built for 1344 updates)
    recipe = SFTRecipe(quick_config("tiny_full.yaml", tiny_dir, tmp_path / "full", "--learning_rate", "2e-3",
                                    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                                    "--warmup_steps", "10", "--lr_scheduler_type", "cosine"))
    given = recipe.config.to_dict()
    recipe.build_trainer()
    row = recipe.train_split.dataset[0]
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == 106  # prompt masked, end-of-turn trained
    metrics = recipe.run()
    losses = logged_losses(recipe)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert metrics["train_rows"] == 200
    assert recipe.config.to_dict() == given  # the recipe (and trl's trainer) left the config as it was given
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert reloaded.config.model_type == "llama"


@pytest.mark.parametrize("config_name", ["tiny_lora.yaml", "tiny_qlora.yaml"])
def test_lora_and_qlora_train_save_merge_generate(tiny_dir, tmp_path, config_name):
    out = tmp_path / "adapter"
    recipe = SFTRecipe(quick_config(config_name, tiny_dir, out))
    recipe.run()
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    losses = logged_losses(recipe)
    assert losses[-1] < losses[0], losses
    lora_b = [p for n, p in recipe.trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.any(p != 0) for p in lora_b)  # adapters really moved

    merged_dir = merge_adapter(out, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the merged model computes what base + adapter computed
    reference = load_model(tiny_dir, adapter=out, quantization="4bit" if "qlora" in config_name else None)
    ids = torch.tensor([[1, 104, 2134, 105, 390, 146, 179, 106, 104, 524, 573, 1204, 105, 390]])
    with torch.no_grad():
        expected, actual = reference(ids).logits.float(), merged(ids).logits.float()
    assert torch.allclose(actual, expected, atol=2e-2 if "qlora" in config_name else 1e-4), (
        (actual - expected).abs().max()
    )
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_qlora_trains_after_an_eval_forward_and_guard_catches_zero_gradients(tiny_dir, tmp_path):
    """bitsandbytes on CPU: docs/stack_notes.md measured LoRA gradients of exactly zero after a no-grad forward on a
    4-bit model (trap 1). Run that sequence for real and check gradients flow; and check the guard that stops a run
    whose LoRA weights get no gradient (whatever the cause) instead of letting it train nothing."""
    recipe = SFTRecipe(quick_config("tiny_qlora.yaml", tiny_dir, tmp_path / "trap", "--max_steps", "2"))
    trainer = recipe.build_trainer()
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LoraGradientGuard))
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(torch.tensor([[1, 5, 6, 7]]))
    trainer.model.train()
    if converted_for_cpu_inference(trainer.model):  # CPUs with AVX512-BF16: bitsandbytes rewrote the weights
        with pytest.raises(RuntimeError, match="CPU inference layout"):
            recipe.run()
        recipe = SFTRecipe(quick_config("tiny_qlora.yaml", tiny_dir, tmp_path / "reloaded", "--max_steps", "2"))
        trainer = recipe.build_trainer()  # the remedy the error names: a freshly loaded model trains
    recipe.run()  # the guard would raise here if the LoRA gradients were zero
    assert all(torch.any(p != 0) for n, p in trainer.model.named_parameters() if "lora_B" in n)

    class State:
        global_step = 0

    model = trainer.model
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.grad = torch.zeros_like(parameter)
    with pytest.raises(RuntimeError, match="zero gradients"):
        guard.on_pre_optimizer_step(trainer.args, State(), None, model=model)
    next(p for n, p in model.named_parameters() if "lora_B" in n).grad[0, 0] = 1e-3
    guard.on_pre_optimizer_step(trainer.args, State(), None, model=model)  # one non-zero gradient: no error


def test_ddp_two_processes_both_train(tiny_dir, tmp_path):
    """2-process DDP on CPU (gloo). `accelerate launch --cpu` would silently run one process (docs/stack_notes.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "recipes" / "sft.py"), "--config", str(CONFIGS / "tiny_full.yaml"),
        "--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "ddp"),
        "--num_bundled_examples", "64", "--max_steps", "3", "--disable_tqdm", "true", "--use_cpu", "true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = re.findall(r"(rank \d/2): steps=(\d+) trainable_checksum=(\S+?e[+-]\d+)", result.stdout)
    assert sorted(rank for rank, _, _ in summaries) == ["rank 0/2", "rank 1/2"], result.stdout[-2000:]
    assert all(steps == "3" for _, steps, _ in summaries)
    checksums = {checksum for _, _, checksum in summaries}
    assert len(checksums) == 1  # both ranks ended on the same (all-reduced) weights


def test_shipped_sft_configs_parse() -> None:
    names = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("tiny_", "yulan_mini_instruct_")))
    assert {"tiny_full.yaml", "tiny_lora.yaml", "tiny_qlora.yaml"} <= set(names)
    # the real-model configs train in bf16, which TrainingArguments refuses on a machine without a GPU
    cpu_override = [] if torch.cuda.is_available() else ["--bf16", "false"]
    for name in names:
        config = parse_config(["--config", str(CONFIGS / name), *cpu_override])
        assert config.model_name_or_path and config.learning_rate > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only defaults")
def test_bf16_on_a_cpu_only_machine_is_accepted() -> None:
    """`--bf16 true` without a GPU used to stop in transformers ("You need to assign use_cpu"); now it means bf16
    autocast on the CPU. Without it the CPU default stays fp32. The same for DPO and GRPO."""
    from yulan_tune.dpo import parse_config as parse_dpo
    from yulan_tune.grpo import parse_config as parse_grpo

    for parse in (parse_config, parse_dpo, parse_grpo):
        config = parse(["--output_dir", "out", "--bf16", "true"])
        assert config.bf16 and config.use_cpu
        assert not parse(["--output_dir", "out"]).bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only defaults")
@pytest.mark.parametrize("bf16_units", [True, False])
def test_quickstart_sft_uses_bf16_only_where_the_cpu_computes_it(tiny_dir, tmp_path, monkeypatch, bf16_units) -> None:
    """Emulated bf16 is slower than fp32, so the quickstart asks for it only on a CPU with bf16 units."""
    import yulan_tune.quickstart as quickstart
    import yulan_tune.training.post_training as post_training

    monkeypatch.setattr(post_training, "cpu_has_bf16_units", lambda: bf16_units)
    recipe = quickstart.quickstart_sft(tiny_dir, tmp_path / "model")
    assert recipe.config.bf16 is bf16_units and recipe.config.use_cpu is bf16_units
