"""Preference training through trl on the tiny YuLan: losses checked against independent formulas, LoRA reference
sharing, precomputed reference log-probs, QLoRA gradients, resume, and the shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from yulan_tune.cli import main as cli_main
from yulan_tune.data.preferences import math_preference_pairs, tokenize_preferences
from yulan_tune.dpo import DPOConfig, DPORecipe, parse_config, preference_method
from yulan_tune.evaluation.preferences import completion_logps
from yulan_tune.export import read_adapter_info
from yulan_tune.paths import RECIPES_DIR

N_PAIRS, N_HELDOUT = 16, 8


def _config(tiny_dir: Path, out: Path, **overrides) -> DPOConfig:
    values = dict(model_name_or_path=str(tiny_dir), output_dir=str(out), num_bundled_pairs=N_PAIRS,
                  eval_dataset="bundled:math_preferences",
                  num_heldout_pairs=N_HELDOUT, max_length=128, per_device_train_batch_size=4,
                  per_device_eval_batch_size=N_HELDOUT, max_steps=1, learning_rate=1e-3, logging_steps=1,
                  save_strategy="no", report_to="none", disable_tqdm=True, lr_scheduler_type="constant",
                  warmup_steps=0, activation_checkpointing=False, seed=0, lora_r=8, lora_alpha=16)
    values.update(overrides)
    return DPOConfig(**values)


def _logps(model, columns: dict, key: str, pad: int, average: bool = False) -> torch.Tensor:
    return completion_logps(model, columns["prompt_ids"], columns[key], pad_token_id=pad, average=average)


def test_dpo_loss_equals_the_formula_on_independent_logps(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "dpo", beta=0.1))
    metrics = recipe.run()
    trainer, tokenizer = recipe.trainer, recipe.tokenizer
    # step 1: policy == reference, so every margin is 0 and the loss is exactly -log sigmoid(0) = log 2
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # after training: trl's loss on the held-out pairs == -log sigmoid(beta * margin) computed from our own
    # log-probs of the trained policy and of the model before training (recorded by the recipe)
    heldout = recipe.heldout.columns
    trainer.model.eval()
    chosen = _logps(trainer.model, heldout, "chosen_ids", tokenizer.pad_token_id)
    rejected = _logps(trainer.model, heldout, "rejected_ids", tokenizer.pad_token_id)
    ref_chosen, ref_rejected = recipe.reference_heldout
    expected = -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean().item()
    result = trainer.evaluate(eval_dataset=recipe.heldout.to_dataset())
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-4)
    margins = (chosen - ref_chosen) - (rejected - ref_rejected)
    assert metrics["heldout_after"]["reward_accuracy"] == pytest.approx(((margins > 0).float().mean()).item())
    assert metrics["heldout_before"]["reward_accuracy"] == 0.5
    assert (Path(tmp_path / "dpo") / "model.safetensors").exists()
    # the held-out pairs are scored with dropout off, and the model is handed back in the mode it was in
    modes: list[bool] = []
    handle = trainer.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.model.train()
    recipe.evaluate_heldout(trainer.model)
    handle.remove()
    assert modes and not any(modes) and trainer.model.training


def test_user_data_gets_no_bundled_heldout_pairs(tmp_path: Path) -> None:
    """Held-out metrics on bundled math pairs say nothing about a run on the user's own data: none by default."""
    assert DPOConfig(output_dir=str(tmp_path), dataset="mine.jsonl").eval_dataset is None


def test_dpo_plus_nll_adds_the_mean_chosen_token_nll(tiny_dir: Path, tmp_path: Path) -> None:
    # dpo_tiny.yaml's loss (RPO, Pang et al. 2024): DPO's -log sigmoid(beta * margin) plus the mean negative
    # log-likelihood of the chosen response tokens, weight 1 each
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "rpo", beta=0.1, loss_type=["sigmoid", "sft"]))
    recipe.run()
    trainer, pad = recipe.trainer, recipe.tokenizer.pad_token_id
    heldout = recipe.heldout.columns
    trainer.model.eval()
    chosen = _logps(trainer.model, heldout, "chosen_ids", pad)
    rejected = _logps(trainer.model, heldout, "rejected_ids", pad)
    ref_chosen, ref_rejected = recipe.reference_heldout
    dpo = -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean().item()
    nll = -chosen.sum().item() / sum(len(ids) for ids in heldout["chosen_ids"])  # one eval batch: token mean
    result = trainer.evaluate(eval_dataset=recipe.heldout.to_dataset())
    assert nll > 0.1 and result["eval_loss"] == pytest.approx(dpo + nll, rel=1e-4)


def test_lora_dpo_keeps_one_copy_of_the_base_weights(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "lora", use_peft=True, max_steps=1))
    trainer = recipe.build_trainer()
    model = trainer.model
    assert trainer.ref_model is None
    # every base weight is stored once: no parameter shares storage with another, and the base parameter count is
    # exactly the plain model's
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(pointers) == len(set(pointers))
    base_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert base_numel == plain
    # the reference forward runs on the same base modules, with the adapter switched off: in one training step the
    # base projection runs twice (policy + reference) and its LoRA branch once (policy only)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    calls = {"base": 0, "lora": 0}
    hooks = [layer.base_layer.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
             layer.lora_A["default"].register_forward_hook(lambda *a: calls.__setitem__("lora", calls["lora"] + 1))]
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert calls == {"base": 2, "lora": 1}
    # base weights untouched: with the adapter disabled the trained model scores exactly the pre-training values
    model.eval()
    with model.disable_adapter():
        chosen = _logps(model, recipe.heldout.columns, "chosen_ids", recipe.tokenizer.pad_token_id)
    torch.testing.assert_close(chosen, recipe.reference_heldout[0])


def test_precomputed_reference_logps_match_the_model_before_training(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "pre", precompute_ref_log_probs=True))
    trainer = recipe.build_trainer()
    assert trainer.ref_model is None  # no reference copy kept for full training either
    columns = recipe.train_data.columns
    expected = _logps(trainer.model, columns, "chosen_ids", recipe.tokenizer.pad_token_id)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_chosen_logps"]), expected, atol=1e-4,
                               rtol=1e-5)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_equal_their_formulas(loss: str, tiny_dir: Path, tmp_path: Path) -> None:
    beta, gamma = 2.0, 0.5
    recipe = DPORecipe(_config(tiny_dir, tmp_path / loss, loss_type=[loss], beta=beta, simpo_gamma=gamma,
                               eval_dataset=None))
    trainer = recipe.build_trainer()
    model, pad = trainer.model, recipe.tokenizer.pad_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    columns = {k: v[:4] for k, v in recipe.train_data.columns.items()}
    with torch.no_grad():
        loss_value = trainer.compute_loss(model, batch).item()
    chosen = _logps(model, columns, "chosen_ids", pad, average=True)
    rejected = _logps(model, columns, "rejected_ids", pad, average=True)
    if loss == "simpo":  # Meng et al. 2024, eq. 6: length-normalized, no reference, target margin gamma
        expected = -F.logsigmoid(beta * (chosen - rejected) - gamma).mean().item()
    else:  # Hong et al. 2024, eq. 6-7; trl's NLL term covers every non-pad token of the chosen sequence
        full = [p + c for p, c in zip(columns["prompt_ids"], columns["chosen_ids"])]
        token_sum = completion_logps(model, [f[:1] for f in full], [f[1:] for f in full], pad_token_id=pad)
        nll = -token_sum.sum().item() / sum(len(f) - 1 for f in full)

        def log1mexp(x: torch.Tensor) -> torch.Tensor:
            return torch.log1p(-torch.exp(x))

        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        expected = nll - beta * F.logsigmoid(log_odds).mean().item()
    assert loss_value == pytest.approx(expected, rel=1e-4)


def test_kto_on_unpaired_rows(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "kto", loss_type=["kto"], use_peft=True))
    trainer = recipe.build_trainer()
    assert len(recipe.train_data) == 2 * N_PAIRS and sorted(set(recipe.train_data.columns["label"])) == [False, True]
    # KL completions are the completions rotated by one inside each batch (mismatched pairs, KTO section 4.1)
    rows = trainer.train_dataset
    assert rows["KL_completion_ids"][:4] == [rows["completion_ids"][3]] + rows["completion_ids"][:3]
    # policy == reference before training: every reward and the KL estimate are 0, so each row's loss is
    # 1 - sigmoid(0) = 0.5 (KTO eq. 8 with unit weights)
    batch = trainer.data_collator([rows[i] for i in range(4)])
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(0.5, abs=1e-5)


def test_qlora_dpo_gets_lora_gradients_after_reference_forwards(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import TrainerCallback

    class GradientRecorder(TrainerCallback):
        norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append(sum(p.grad.norm().item() for n, p in model.named_parameters()
                                  if "lora_B" in n and p.grad is not None))

    recipe = DPORecipe(_config(tiny_dir, tmp_path / "qlora", use_peft=True, load_in_4bit=True, max_steps=2,
                               eval_dataset=None))
    trainer = recipe.build_trainer()
    assert trainer.model.get_base_model().is_loaded_in_4bit
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    recipe.run()
    # bitsandbytes trap 1 would zero every LoRA gradient after the first no-grad reference forward
    assert len(recorder.norms) == 2 and all(norm > 0 for norm in recorder.norms)
    # the adapter says what it was trained on, so `yulan-tune merge` merges it into the dequantized 4-bit weights
    assert read_adapter_info(tmp_path / "qlora") == {"base": str(tiny_dir), "quantization": "4bit"}


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_dir: Path, tmp_path: Path) -> None:
    common = ["--model_name_or_path", str(tiny_dir), "--num_bundled_pairs", "16", "--eval_dataset", "",
              "--max_length", "128", "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate",
              "1e-3", "--use_peft", "true", "--lora_r", "8", "--save_strategy", "steps", "--save_steps", "1",
              "--report_to", "none", "--disable_tqdm", "true", "--activation_checkpointing", "false", "--bf16", "false"]
    assert cli_main(["dpo", *common, "--output_dir", str(tmp_path / "full")]) == 0
    assert cli_main(["dpo", *common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                     str(tmp_path / "full" / "checkpoint-1")]) == 0
    from safetensors.torch import load_file

    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    halfway = load_file(tmp_path / "full" / "checkpoint-1" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name])
    assert any(not torch.equal(full[n], halfway[n]) for n in full)  # step 2 did change the adapter


def test_loss_choice_and_data_mismatch_errors(tiny_dir: Path, tmp_path: Path) -> None:
    assert [preference_method(x) for x in (["sigmoid"], ["ipo"], ["hinge"], ["sigmoid", "sft"], ["simpo"],
                                           ["orpo"], ["kto"])] == ["dpo"] * 4 + ["simpo", "orpo", "kto"]
    with pytest.raises(ValueError, match="exactly one of"):
        preference_method(["sigmoid", "simpo"])
    data = tmp_path / "kto.jsonl"
    data.write_text('{"prompt": "2+2?", "completion": "4", "label": true}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"unpaired rows \(prompt/completion/label\) need loss_type: \[kto\]"):
        DPORecipe(_config(tiny_dir, tmp_path / "x", dataset=str(data), eval_dataset=None)).prepare_data()


def test_shipped_configs_parse_with_the_yulan_recipe() -> None:
    configs = sorted((RECIPES_DIR / "configs").glob("dpo_*.yaml"))
    assert {"dpo_tiny.yaml", "dpo_yulan_mini_instruct_80gb.yaml"} <= {c.name for c in configs}
    # the real-model configs train in bf16, which TrainingArguments refuses on a machine without a GPU
    cpu_override = [] if torch.cuda.is_available() else ["--bf16", "false"]
    for path in configs:
        config = parse_config(["--config", str(path), *cpu_override])
        assert config.method in ("dpo", "simpo", "orpo", "kto"), path
        if path.name.startswith("dpo_yulan_mini_instruct"):
            # docs/yulan_reference.md section 6: beta 0.1, 2 epochs, batch 128 (per device x accumulation on one GPU)
            assert config.model_name_or_path == "yulan-team/YuLan-Mini-Instruct"
            assert (config.beta, config.num_train_epochs) == (0.1, 2)
            assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128
    full_80gb = RECIPES_DIR / "configs" / "dpo_yulan_mini_instruct_80gb.yaml"
    full = parse_config(["--config", str(full_80gb), *cpu_override])
    assert full.learning_rate == 5e-7 and not full.use_peft


def test_bundled_pairs_tokenize_within_the_tiny_limit(tiny_tokenizer) -> None:
    pairs = tokenize_preferences(math_preference_pairs(50), tiny_tokenizer, max_length=256)
    assert len(pairs) == 50 and not pairs.report


def test_first_difference_span_trains_on_the_mistake_only(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = DPORecipe(_config(tiny_dir, tmp_path / "step", rejected_span="first_difference"))
    metrics = recipe.run()
    rows = recipe.trainer.train_dataset
    whole = tokenize_preferences(math_preference_pairs(N_PAIRS), recipe.tokenizer, max_length=128)
    cut = 0
    for chosen, rejected, full_rejected in zip(rows["chosen_ids"], rows["rejected_ids"],
                                               whole.columns["rejected_ids"]):
        first = next(i for i, (a, b) in enumerate(zip(chosen, full_rejected)) if a != b)
        assert rejected == full_rejected[: first + 1] and rejected[-1] != chosen[first]
        cut += len(rejected) < len(full_rejected)
    # the chosen answers stay whole; the count of cut answers is reported; held-out pairs are scored whole
    assert rows["chosen_ids"] == whole.columns["chosen_ids"]
    assert metrics["rejected_cut"] == cut > 0
    assert recipe.heldout.columns["rejected_ids"][0][-1] == recipe.tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_first_difference_span_needs_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rejected_span"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["kto"], rejected_span="first_difference")
    with pytest.raises(ValueError, match="rejected_span"):
        DPOConfig(output_dir=str(tmp_path), rejected_span="first_step")
