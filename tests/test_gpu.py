"""Every CUDA path of the recipes on the tiny YuLan (minutes on one GPU): `pytest -m gpu tests/test_gpu.py`, run by
`make gpu-check` (benchmarks/gpu_check.sh). Skipped without CUDA (tests/conftest.py).

Tolerances of the kernel-parity checks: both sides compute in bf16 (8 significant bits, relative rounding 2^-8 =
0.0039) with different reduction orders and fusions, so per-token losses can differ by a few roundings; the mean
loss is compared at 1% relative, about 2.5 bf16 roundings, which a wrong kernel (a missing scale, a wrong mask)
exceeds by orders of magnitude.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yulan_tune.dpo import DPORecipe
from yulan_tune.dpo import parse_config as parse_dpo_config
from yulan_tune.loading import load_model
from yulan_tune.paths import REPO_ROOT
from yulan_tune.pretrain import PretrainConfig, PretrainRecipe
from yulan_tune.sft import SFTRecipe
from yulan_tune.sft import parse_config as parse_sft_config
from yulan_tune.tiny import TINY_CURRICULUM, TINY_SHAPE

pytestmark = pytest.mark.gpu
CONFIGS = REPO_ROOT / "recipes" / "configs"
ACCELERATE = REPO_ROOT / "recipes" / "accelerate"
BF16_RELATIVE = 1e-2


def sft(config: str, tiny_dir: Path, out: Path, *extra: str) -> SFTRecipe:
    return SFTRecipe(parse_sft_config(["--config", str(CONFIGS / config), "--model_name_or_path", str(tiny_dir),
                                       "--output_dir", str(out), "--num_bundled_examples", "200", "--max_steps", "6",
                                       "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none",
                                       *extra]))


def losses(recipe) -> list[float]:
    return [entry["loss"] for entry in recipe.trainer.state.log_history if "loss" in entry]


def test_qlora_4bit_with_device_map_and_a_paged_optimizer(tiny_dir, tmp_path):
    recipe = sft("tiny_qlora.yaml", tiny_dir, tmp_path / "qlora", "--optim", "paged_adamw_8bit", "--bf16", "true",
                 "--dtype", "bfloat16")
    trainer = recipe.build_trainer()
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit and next(base.parameters()).device.type == "cuda"
    torch.cuda.reset_peak_memory_stats()
    recipe.run()
    assert all(torch.any(p != 0) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert losses(recipe)[-1] < losses(recipe)[0]
    print(f"QLoRA peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def test_bf16_full_fine_tune_lowers_the_loss(tiny_dir, tmp_path):
    # six updates of 8 rows with a warmup, as tests/test_sft.py's CPU version
    recipe = sft("tiny_full.yaml", tiny_dir, tmp_path / "full", "--bf16", "true", "--learning_rate", "2e-3",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--warmup_steps", "10",
                 "--lr_scheduler_type", "cosine")
    recipe.run()
    assert next(recipe.trainer.model.parameters()).device.type == "cuda"
    assert losses(recipe)[-1] < losses(recipe)[0] - 0.5, losses(recipe)


def test_lora_dpo_on_cuda(tiny_dir, tmp_path):
    config = parse_dpo_config(["--config", str(CONFIGS / "dpo_tiny_lora.yaml"), "--model_name_or_path", str(tiny_dir),
                               "--output_dir", str(tmp_path / "dpo"), "--num_bundled_pairs", "32",
                               "--num_heldout_pairs", "16", "--max_steps", "3", "--eval_math_problems", "0",
                               "--bf16", "true", "--disable_tqdm", "true"])
    metrics = DPORecipe(config).run()
    assert metrics["heldout_pairs"] == 16 and 0.0 <= metrics["heldout_after"]["reward_accuracy"] <= 1.0


def packed_batch(vocab: int, lengths=(37, 64, 27)) -> dict[str, torch.Tensor]:
    """One padding-free row of three documents, position_ids restarting per document (as trl's packing gives)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(200, vocab, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"input_ids": ids.cuda(), "position_ids": positions.cuda(), "labels": ids.cuda()}


def test_flash_attention_varlen_matches_sdpa_on_packed_rows(tiny_dir):
    pytest.importorskip("flash_attn")
    batch = packed_batch(TINY_SHAPE["vocab_size"])
    results = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = load_model(tiny_dir, dtype=torch.bfloat16, attn_implementation=implementation).cuda()
        with torch.no_grad():
            results[implementation] = model(**batch).loss.float().item()
    assert load_model(tiny_dir, dtype=torch.bfloat16).config._attn_implementation == "flash_attention_2"  # auto
    assert results["flash_attention_2"] == pytest.approx(results["sdpa"], rel=BF16_RELATIVE)


def test_liger_kernels_on_and_off_give_the_same_first_loss(tiny_dir, tmp_path):
    pytest.importorskip("liger_kernel")
    first = {}
    for liger in ("true", "false"):
        recipe = sft("tiny_full.yaml", tiny_dir, tmp_path / f"liger-{liger}", "--bf16", "true", "--max_steps", "1",
                     "--use_liger_kernel", liger)
        recipe.run()
        assert recipe.config.use_liger_kernel == (liger == "true")
        first[liger] = losses(recipe)[0]
    assert first["true"] == pytest.approx(first["false"], rel=BF16_RELATIVE)


def test_yulanmini_pretraining_steps_on_cuda(tmp_path, tiny_dir):
    shape = {key: TINY_SHAPE[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size")}
    config = PretrainConfig(
        output_dir=str(tmp_path / "run"), curriculum=str(TINY_CURRICULUM), data_root=str(tmp_path / "data"),
        prepare_bundled_data=True, tokenizer=str(tiny_dir), seq_len=256, bf16=True,
        model_config={**shape, "dim_model_base_lr": 64}, per_device_train_batch_size=4,
        warmup_steps=1, save_steps=10**9, monitor_every_steps=2, logging_steps=1, report_to="none",
        export_llama=False, disable_tqdm=True, stop_after_phase="code",
    )
    result = PretrainRecipe(config).run()
    assert result["phases_run"] == ["code"] and result["train_metrics"]["train_loss"] > 0


def launch(config_file: Path, tiny_dir: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_processes", "1", str(REPO_ROOT / "recipes" / "sft.py"), "--config", str(CONFIGS / "tiny_full.yaml"),
               "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--num_bundled_examples", "64",
               "--max_steps", "2", "--bf16", "true", "--report_to", "none"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_fsdp_config_trains_on_one_gpu(tiny_dir, tmp_path):
    result = launch(ACCELERATE / "fsdp.yaml", tiny_dir, tmp_path / "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"sft: full fine-tune of .*: 2 steps", result.stdout), result.stdout[-2000:]


def test_deepspeed_zero2_trains_one_step(tiny_dir, tmp_path):
    pytest.importorskip("deepspeed")
    result = launch(ACCELERATE / "deepspeed_zero2.yaml", tiny_dir, tmp_path / "zero2")
    assert result.returncode == 0, result.stderr[-3000:]
