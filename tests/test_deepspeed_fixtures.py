"""DeepSpeed universal checkpoints written by DeepSpeed 0.19.8 itself (tests/fixtures/deepspeed/make_fixtures.py, run
in its own environment), read without DeepSpeed and compared bit for bit with the live engine state the script saved
beside each: fp32 masters, exp_avg, exp_avg_sq and the step. Then the step-folder choice on a repository with two
folders and a stale latest_universal, fp32 moments whatever the compute dtype, and one anneal step from the
DeepSpeed-written state against AdamW written out here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from yulan_tune.anneal import AnnealRecipe
from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM
from yulan_tune.training.checkpoints import DOCUMENTED_OPTIMIZER_STEPS, download_patterns, resolve_source
from yulan_tune.training.mup import mup_adamw
from yulan_tune.training.optim_state import (
    AmbiguousCheckpointError,
    choose_universal_checkpoint,
    load_optimizer_state,
    read_universal_checkpoint,
    safe_torch_load,
)

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"
# (case, step folder): every conversion the fixture script wrote
FOLDERS = [("zero2_fused_adam", 3), ("zero2_torch_adam", 3), ("zero1_scalars_flat", 3), ("zero3", 3),
           ("two_step_folders", 2), ("two_step_folders", 4)]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def live(case: str, step: int) -> dict:
    return torch.load(FIXTURES / case / f"live_state_step{step}.pt", weights_only=True)


def case_info(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())


def fixture_model(case: str) -> YuLanMiniForCausalLM:
    return YuLanMiniForCausalLM(YuLanMiniConfig.from_pretrained(FIXTURES / case))


def test_fixtures_are_read_without_deepspeed():
    assert importlib.util.find_spec("deepspeed") is None
    assert "deepspeed" not in sys.modules
    for case, step in FOLDERS:
        assert live(case, step)["deepspeed"] == "0.19.8"


@pytest.mark.parametrize("case,step", FOLDERS, ids=[f"{c}-{s}" for c, s in FOLDERS])
def test_universal_checkpoint_equals_the_live_deepspeed_state(case, step):
    expected = live(case, step)
    saved = read_universal_checkpoint(FIXTURES / case / f"global_step{step}_universal")
    assert saved.format == "deepspeed_universal"
    assert saved.global_step == expected["step"] == expected["global_steps"] == step
    assert saved.group_lrs == expected["group_lrs"] and saved.lr == max(expected["group_lrs"])
    assert set(saved.params) == set(expected["params"])  # tied lm_head counted once, as named_parameters() does
    for name, state in expected["params"].items():
        entry = saved.params[name]
        for key, tensor in (("exp_avg", entry.exp_avg), ("exp_avg_sq", entry.exp_avg_sq), ("fp32", entry.master_weight)):
            assert tensor.dtype == torch.float32, (name, key)
            # ZeRO-3 stores flat tensors; 0-dim scalars may be () or (1,): same values either way
            assert torch.equal(tensor.reshape(state[key].shape), state[key]), (name, key)
        assert entry.step == step
    if case_info(case)["stage"] != 3:  # ZeRO-1/2: the tied alias gets an fp32.pt-only folder from the module state
        assert saved.aliases == TIED
        assert any("tied aliases" in note and "lm_head.weight -> model.embed_tokens.weight" in note
                   for note in saved.notes)
        assert not any("never received a gradient" in note for note in saved.notes)


def test_step_files_as_each_optimizer_keeps_them():
    """FusedAdam keeps an int step per flat partition, torch Adam a tensor; ZeRO-3 conversions write no step.pt."""
    name = "model.norm.weight"
    fused = safe_torch_load(FIXTURES / "zero2_fused_adam/global_step3_universal/zero" / name / "step.pt")
    torch_adam = safe_torch_load(FIXTURES / "zero2_torch_adam/global_step3_universal/zero" / name / "step.pt")
    assert live("zero2_fused_adam", 3)["step_type"] == ["int"] and type(fused) is int and fused == 3
    assert live("zero2_torch_adam", 3)["step_type"] == ["Tensor"] and torch.is_tensor(torch_adam)
    assert not (FIXTURES / "zero3/global_step3_universal/zero" / name / "step.pt").exists()
    flat = safe_torch_load(FIXTURES / "zero3/global_step3_universal/zero/model.layers.0.mlp.up_proj.weight/exp_avg.pt")
    assert torch.is_tensor(flat) and flat.dim() == 1  # a bare flat tensor, not {"param": ...}


def test_scalar_files_hold_both_shapes():
    """The 0-dim WeSaR scalars as a converter that restores shapes writes them, and as one that flattens them."""
    scalar = "model.layers.0.gate_up_proj_alpha"
    kept = safe_torch_load(FIXTURES / "zero2_torch_adam/global_step3_universal/zero" / scalar / "exp_avg.pt")
    flat = safe_torch_load(FIXTURES / "zero1_scalars_flat/global_step3_universal/zero" / scalar / "exp_avg.pt")
    assert kept["param"].shape == () and flat["param"].shape == (1,)
    assert fixture_model("zero2_torch_adam").get_parameter(scalar).shape == ()


def test_optimizer_state_file_with_deepspeeds_enum_and_loss_scaler():
    common = safe_torch_load(FIXTURES / "zero2_torch_adam/global_step3_universal/zero/optimizer_state.pt")
    assert common["loss_scaler"].pickled_name == "deepspeed.runtime.fp16.loss_scaler.LossScaler"
    assert common["zero_stage"].pickled_name == "deepspeed.runtime.zero.config.ZeroStageEnum"
    assert common["zero_stage"].args == (2,) and common["ds_version"] == "0.19.8"
    assert "deepspeed" not in sys.modules  # placeholders, no DeepSpeed code ran
    saved = read_universal_checkpoint(FIXTURES / "zero1_scalars_flat")
    assert any("ZeRO stage 1" in note for note in saved.notes)


@pytest.mark.parametrize("case", ["zero2_fused_adam", "zero1_scalars_flat", "zero3"])
def test_loaded_into_our_model_bit_equal(case):
    """load_optimizer_state puts exactly the live DeepSpeed moments, step and fp32 masters into a torch AdamW over
    our yulanmini (muP groups, tied embedding)."""
    expected = live(case, 3)
    model = fixture_model(case)
    optimizer = mup_adamw(model, lr=1e-2)
    report = load_optimizer_state(FIXTURES / case, model, optimizer, load_master_weights=True)
    parameters = dict(model.named_parameters())
    assert len(report.loaded) == report.master_weights_loaded == len(parameters) == len(expected["params"])
    assert not report.missing and not report.unexpected
    for name, param in parameters.items():
        state = optimizer.state[param]
        assert torch.equal(param.detach(), expected["params"][name]["fp32"])
        assert torch.equal(state["exp_avg"], expected["params"][name]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], expected["params"][name]["exp_avg_sq"])
        assert float(state["step"]) == expected["step"]


def test_fp32_moments_are_never_rounded_into_bf16_parameters():
    model = fixture_model("zero2_torch_adam").to(torch.bfloat16)
    with pytest.raises(ValueError, match="would round the optimizer state"):
        load_optimizer_state(FIXTURES / "zero2_torch_adam", model, mup_adamw(model, lr=1e-2))


# ------------------------------------------------------------------------------------------------- step folders


@pytest.fixture
def two_folders(tmp_path):
    """The two-folder fixture (latest_universal names global_step4_universal, converted last) as a model repo."""
    root = tmp_path / "repo"
    shutil.copytree(FIXTURES / "two_step_folders", root)
    assert (root / "latest_universal").read_text().strip() == "global_step4_universal"
    return root


def test_several_folders_and_nothing_to_tell_them_apart_is_refused(two_folders):
    with pytest.raises(AmbiguousCheckpointError) as error:
        choose_universal_checkpoint(two_folders)
    message = str(error.value)
    assert "\n" not in message
    assert "global_step2_universal, global_step4_universal" in message and "latest_universal names" in message
    assert "optimizer_state_step" in message and "243198" in message
    with pytest.raises(AmbiguousCheckpointError):
        resolve_source(str(two_folders))  # the anneal's own entry point refuses the same way


def test_named_step_wins_over_latest_universal(two_folders):
    choice = choose_universal_checkpoint(two_folders, step=2)
    assert choice.folder.name == "global_step2_universal" and choice.reason == "optimizer_state_step=2"
    assert any("latest_universal names 'global_step4_universal'" in note for note in choice.notes)
    saved = read_universal_checkpoint(two_folders, step=2)
    expected = live("two_step_folders", 2)
    assert saved.global_step == 2
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(saved.params[name].exp_avg_sq, expected["params"][name]["exp_avg_sq"])
    source = resolve_source(str(two_folders), optimizer_state_step=2)
    assert source.optimizer_dir == two_folders / "global_step2_universal"
    with pytest.raises(FileNotFoundError, match="no global_step3_universal.*global_step2_universal, global_step4"):
        choose_universal_checkpoint(two_folders, step=3)


def test_recorded_step_of_the_weights_chooses(two_folders):
    (two_folders / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    choice = choose_universal_checkpoint(two_folders)
    assert choice.folder.name == "global_step2_universal" and "trainer_state.json" in choice.reason
    # a recorded step that matches no folder decides nothing
    (two_folders / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    with pytest.raises(AmbiguousCheckpointError, match="says 7"):
        choose_universal_checkpoint(two_folders)


def test_config_step_counter_chooses_only_when_it_matches(two_folders):
    """Without trainer_state.json the yulanmini config's step counter is the weights' record; Before-Annealing's says
    253006, which is neither 243198 nor 262772, so there it decides nothing and the run refuses."""
    config_file = two_folders / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_steps_trained_before_this_epoch": 4}))
    choice = choose_universal_checkpoint(two_folders)
    assert choice.folder.name == "global_step4_universal" and "num_steps_trained_before_this_epoch" in choice.reason
    config_file.write_text(json.dumps({**config, "num_steps_trained_before_this_epoch": 253006}))
    with pytest.raises(AmbiguousCheckpointError, match="says 253006"):
        choose_universal_checkpoint(two_folders)


def test_pointer_to_a_removed_folder_falls_back(two_folders):
    shutil.rmtree(two_folders / "global_step4_universal")  # latest_universal still names it
    choice = choose_universal_checkpoint(two_folders)
    assert choice.folder.name == "global_step2_universal" and choice.reason == "the only step folder"
    assert any("not here" in note for note in choice.notes)
    assert read_universal_checkpoint(two_folders).global_step == 2


def test_before_annealing_default_and_download_patterns():
    assert DOCUMENTED_OPTIMIZER_STEPS["yulan-team/YuLan-Mini-Before-Annealing"] == 243198
    patterns = download_patterns(243198)
    assert "global_step243198_universal/*" in patterns and not any("262772" in p for p in patterns)
    with pytest.raises(FileNotFoundError, match=r"--include 'global_step243198_universal/\*'"):
        resolve_source("yulan-team/YuLan-Mini-Before-Annealing")  # tests run offline (HF_HUB_OFFLINE=1)


# ------------------------------------------------------------------------------------------------- anneal step


class FirstStep(TrainerCallback):
    """Parameters, gradients, moments and LRs at the moment the first optimizer step is taken."""

    def __init__(self):
        self.seen = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.seen is not None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.seen = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                s = optimizer.state[p]
                self.seen[names[id(p)]] = dict(param=p.detach().clone(), grad=p.grad.detach().clone(),
                                               exp_avg=s["exp_avg"].clone(), exp_avg_sq=s["exp_avg_sq"].clone(),
                                               step=float(s["step"]), lr=group["lr"], lr_scale=group["lr_scale"],
                                               weight_decay=group["weight_decay"], betas=group["betas"],
                                               eps=group["eps"])


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW step as DeepSpeed's FusedAdam (adam_w_mode) and torch.optim.AdamW define it, written out: decoupled
    weight decay, then the bias-corrected moment update at optimizer step t = saved step + 1."""
    beta1, beta2 = betas
    t = step + 1
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    return param * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)


def rounding_bound(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """How far a float32 AdamW step may lie from the float64 one: a few rounding errors (float32 eps = 2**-23) of the
    decayed parameter and of the terms of the update. The first moment is a sum of two terms that can cancel, so its
    error scales with |beta1 m| + |(1 - beta1) g|, not with m; 2**-21 allows four roundings of each."""
    beta1, beta2 = betas
    t = step + 1
    v_hat = (beta2 * exp_avg_sq + (1 - beta2) * grad * grad) / (1 - beta2**t)
    terms = (beta1 * exp_avg.abs() + (1 - beta1) * grad.abs()) / (1 - beta1**t)
    return 2.0**-21 * (param.abs() + lr * terms / (v_hat.sqrt() + eps))


def test_anneal_first_step_continues_the_deepspeed_state(tmp_path, tiny_dir):
    """AnnealRecipe from the DeepSpeed-written checkpoint (bf16 safetensors + global_step3_universal, tied embedding,
    0-dim scalars, two LR groups): the first optimizer step starts from the live DeepSpeed masters and moments (bit
    equal) and takes the AdamW step written out above at t = 4 and the checkpoint's LR."""
    source = tmp_path / "before-annealing"
    shutil.copytree(FIXTURES / "zero2_fused_adam", source)
    for file in tiny_dir.iterdir():  # the tiny tokenizer: its 4096-token vocabulary is the fixture model's
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(file, source / file.name)
    texts = [f"Question: what is {a} plus {a + 3}?\nAnswer: {2 * a + 3}." for a in range(40)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    seq_len, batch = 16, 2
    recipe = AnnealRecipe.from_pretrained(
        str(source), data={str(tmp_path / "data.jsonl"): 1.0}, tokens=seq_len * batch, seq_len=seq_len,
        output_dir=str(tmp_path / "out"), packed_data_dir=str(tmp_path / "packed"), per_device_train_batch_size=batch,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=0.0)
    expected = live("zero2_fused_adam", 3)
    assert recipe.decay_steps == 1 and recipe.start_step == 3 and recipe.peak_lr == max(expected["group_lrs"])
    assert recipe.optimizer_checkpoint.choice == "the only step folder (named by latest_universal)"
    trainer = recipe.build_trainer()
    trainer.add_callback(first := FirstStep())
    metrics = recipe.run()

    plan = json.loads((tmp_path / "out" / "anneal_plan.json").read_text())
    assert plan["source_optimizer_state"] == str(source / "global_step3_universal")
    assert plan["checkpoint_step"] == 3 and plan["checkpoint_lr"] == recipe.peak_lr
    assert plan["optimizer_state_choice"] == recipe.optimizer_checkpoint.choice and plan["param_dtype"] == "float32"
    assert metrics["optimizer_state"]["loaded"] == metrics["optimizer_state"]["masters_loaded"] == len(first.seen)

    m_width = recipe.trainer.model.config.mup_width_multiplier
    after = dict(recipe.trainer.model.named_parameters())
    assert set(first.seen) == set(expected["params"])
    moved = 0
    for name, seen in first.seen.items():
        live_state = expected["params"][name]
        # the step starts from DeepSpeed's state, bit for bit, at fp32
        assert seen["param"].dtype == seen["exp_avg"].dtype == torch.float32
        assert torch.equal(seen["param"], live_state["fp32"]), name
        assert torch.equal(seen["exp_avg"], live_state["exp_avg"]), name
        assert torch.equal(seen["exp_avg_sq"], live_state["exp_avg_sq"]), name
        assert seen["step"] == 3
        # the LR is the checkpoint's full rate times the muP group scale (matrices 1/m_width), 1-sqrt at k = 0 is 1
        scale = 1 / m_width if seen["lr_scale"] != 1.0 else 1.0
        assert seen["lr"] == pytest.approx(recipe.peak_lr * scale, rel=1e-12)
        assert seen["betas"] == (0.9, 0.95) and seen["eps"] == 1e-15 and seen["weight_decay"] == 0.1
        want = adamw_step(seen["param"].double(), seen["grad"].double(), seen["exp_avg"].double(),
                          seen["exp_avg_sq"].double(), 3, seen["lr"], seen["betas"], seen["eps"],
                          seen["weight_decay"])
        got = after[name].detach().double()
        bound = rounding_bound(seen["param"].double(), seen["grad"].double(), seen["exp_avg"].double(),
                               seen["exp_avg_sq"].double(), 3, seen["lr"], seen["betas"], seen["eps"],
                               seen["weight_decay"])
        assert bool(((got - want).abs() <= bound).all()), (name, float(((got - want).abs() / bound).max()))
        # and it is not the step fresh moments would give (what a silent re-initialization would do)
        fresh = adamw_step(seen["param"].double(), seen["grad"].double(), torch.zeros_like(want),
                           torch.zeros_like(want), 0, seen["lr"], seen["betas"], seen["eps"], seen["weight_decay"])
        moved += int(not torch.allclose(got, fresh, rtol=1e-4, atol=0))
    assert moved == len(first.seen)
    assert math.isfinite(metrics["train_loss"])
