"""Optimizer-state loading: HF Trainer checkpoints and DeepSpeed universal checkpoints (without DeepSpeed).

The HF checkpoint comes from a real short `transformers.Trainer` run; the universal checkpoint is written by
`write_universal_checkpoint` below, which follows DeepSpeed's `ds_to_universal.py` output layout (read at 0.19.8):
`{"param": tensor, "cat_dim": 0}` per state, `step.pt` as a plain int, `zero/optimizer_state.pt` with the
non-sharded optimizer state (including a pickled DeepSpeed LossScaler object), `mp_rank_00_model_states.pt`
copied from the ZeRO checkpoint, and `latest_universal` next to the step folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from yulan_tune.training.optim_state import (
    UnsafeCheckpointError,
    hf_default_param_groups,
    load_optimizer_state,
    read_optimizer_checkpoint,
    read_universal_checkpoint,
    safe_torch_load,
)

STEPS = 3
LR = 3e-3


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=128, tie_word_embeddings=True,
                         attention_bias=True)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 3-step HF Trainer run with AdamW; returns (checkpoint dir, trainer)."""
    out = tmp_path_factory.mktemp("hf_run")
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (24, 16), generator=generator).tolist()]
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
                             weight_decay=0.1, adam_beta2=0.95, lr_scheduler_type="constant", save_strategy="steps",
                             save_steps=STEPS, report_to=[], use_cpu=True, logging_steps=1, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    return out / f"checkpoint-{STEPS}", trainer


def in_memory_states(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The trained optimizer's live state by model parameter name: the ground truth the files must reproduce."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: state for p, state in optimizer.state.items()}


def assert_states_equal(optimizer: torch.optim.Optimizer, model: torch.nn.Module, expected, step: int) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            state = optimizer.state[param]
            torch.testing.assert_close(state["exp_avg"], expected[name]["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg_sq"], expected[name]["exp_avg_sq"], rtol=0, atol=0)
            assert float(state["step"]) == step
            assert state["exp_avg_sq"].abs().sum() > 0  # not a fresh moment
            seen.add(name)
    assert seen == set(expected)


def named_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """A differently grouped optimizer than the Trainer's (one group, named): loading must go by name."""
    return torch.optim.AdamW(list(model.named_parameters()), lr=LR, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------- HF Trainer format


def test_hf_trainer_checkpoint_roundtrip(trained):
    checkpoint, trainer = trained
    expected = in_memory_states(trainer)
    assert len(expected) == len(list(trainer.model.parameters()))  # tied embedding counted once

    saved = read_optimizer_checkpoint(checkpoint)
    assert saved.format == "hf_trainer" and saved.global_step == STEPS and not saved.named
    assert saved.lr == pytest.approx(LR)

    model = tiny_llama(seed=1)
    optimizer = named_adamw(model)
    report = load_optimizer_state(checkpoint, model, optimizer,
                                  source_param_names=hf_default_param_groups(trainer, model))
    assert report.step == STEPS and not report.missing and not report.unexpected
    assert len(report.loaded) == len(expected)
    assert_states_equal(optimizer, model, expected, STEPS)


def test_hf_unnamed_state_matches_by_position_with_same_grouping(trained):
    checkpoint, trainer = trained
    model = tiny_llama(seed=1)
    groups = hf_default_param_groups(trainer, model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in g]} for g in groups], lr=LR)
    report = load_optimizer_state(checkpoint, model, optimizer)
    assert report.matched_by_position
    assert_states_equal(optimizer, model, in_memory_states(trainer), STEPS)

    # names unknown and a different grouping: refused, not guessed
    with pytest.raises(ValueError, match="cannot match parameters by position"):
        load_optimizer_state(checkpoint, model, torch.optim.AdamW(model.parameters(), lr=LR))


def test_loaded_state_continues_training_identically(trained):
    """One more AdamW step after loading equals one more step of the original optimizer (bias correction uses the
    loaded step, moments are the saved ones)."""
    checkpoint, trainer = trained
    original = trainer.model
    optimizer_original = getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    model = tiny_llama(seed=1)
    model.load_state_dict(original.state_dict())
    optimizer = named_adamw(model)
    load_optimizer_state(checkpoint, model, optimizer, source_param_names=hf_default_param_groups(trainer, model))
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    batch = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    reference = tiny_llama(seed=2)
    reference.load_state_dict(original.state_dict())
    reference_optimizer = torch.optim.AdamW(list(reference.named_parameters()), lr=LR, betas=(0.9, 0.95),
                                            weight_decay=0.0)
    reference_optimizer.load_state_dict(_by_name_state_dict(optimizer_original, original, reference_optimizer,
                                                            reference))
    for m, opt in ((model, optimizer), (reference, reference_optimizer)):
        m(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _by_name_state_dict(source_optimizer, source_model, target_optimizer, target_model):
    """Independent re-keying of the live optimizer state (no yulan_tune code) into target_optimizer's numbering."""
    source_names = {id(p): n for n, p in source_model.named_parameters()}
    by_name = {source_names[id(p)]: s for p, s in source_optimizer.state.items()}
    sd = target_optimizer.state_dict()
    target_names = {id(p): n for n, p in target_model.named_parameters()}
    for group, saved_group in zip(target_optimizer.param_groups, sd["param_groups"]):
        for param, key in zip(group["params"], saved_group["params"]):
            sd["state"][key] = {k: v.clone() for k, v in by_name[target_names[id(param)]].items()}
    return sd


# ---------------------------------------------------------------------------------------------- DeepSpeed universal


def _fake_deepspeed_modules() -> dict[str, types.ModuleType]:
    """Modules named like DeepSpeed's, holding a LossScaler class: DeepSpeed's ZeRO optimizer pickles its loss scaler
    object into optimizer_state.pt (stage_1_and_2.py state_dict()[LOSS_SCALER]), so a faithful file needs a class
    pickled under that global name. Installed in sys.modules only while writing."""
    modules = {name: types.ModuleType(name) for name in
               ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler")}

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale = scale
            self.dynamic = False

    LossScaler.__module__, LossScaler.__qualname__ = "deepspeed.runtime.fp16.loss_scaler", "LossScaler"
    modules["deepspeed.runtime.fp16.loss_scaler"].LossScaler = LossScaler
    return modules


def write_universal_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                               rename=lambda name: name) -> Path:
    """Write `model`/`optimizer` as DeepSpeed's ds_to_universal.py lays out a ZeRO-1/2 conversion."""
    folder = root / f"global_step{step}_universal"
    zero = folder / "zero"
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        param_dir = zero / rename(names[id(param)])
        param_dir.mkdir(parents=True)
        for key, tensor in (("fp32", param.detach().float()), ("exp_avg", state["exp_avg"]),
                            ("exp_avg_sq", state["exp_avg_sq"])):
            torch.save({"param": tensor.clone(), "cat_dim": 0}, param_dir / f"{key}.pt")  # merge_tp_slices
        torch.save(int(state["step"]), param_dir / "step.pt")  # FusedAdam keeps an int step

    fake_modules = _fake_deepspeed_modules()
    loss_scaler_cls = fake_modules["deepspeed.runtime.fp16.loss_scaler"].LossScaler
    saved_modules = {name: sys.modules.get(name) for name in fake_modules}
    sys.modules.update(fake_modules)  # only while pickling: pickle looks the class up by its module path
    try:
        groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
        torch.save({"loss_scaler": loss_scaler_cls(1.0), "dynamic_loss_scale": False, "overflow": False,
                    "clip_grad": 1.0, "zero_stage": 2, "group_paddings": [0] * len(groups),
                    "partition_count": [1] * len(groups), "ds_version": "0.15.4", "param_groups": groups},
                   zero / "optimizer_state.pt")
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

    module_state = OrderedDict((rename(n), t.to(torch.bfloat16)) for n, t in model.state_dict().items())
    param_shapes = [OrderedDict((rename(n), p.shape) for n, p in model.named_parameters())]
    torch.save({"module": module_state, "buffer_names": [], "optimizer": None, "param_shapes": param_shapes,
                "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
                "lr_scheduler": {"base_lrs": [LR] * len(groups), "last_epoch": step, "_last_lr": [LR] * len(groups)},
                "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": step,
                "global_samples": step * 8, "dp_world_size": 1, "mp_world_size": 1,
                "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
                "ds_version": "0.15.4"}, folder / "mp_rank_00_model_states.pt")
    (root / "latest_universal").write_text(folder.name)
    return folder


@pytest.fixture(scope="module")
def universal(trained, tmp_path_factory):
    _, trainer = trained
    root = tmp_path_factory.mktemp("universal")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    # DeepSpeed's parameter names are the engine module's named_parameters(): the HF names, tied embedding once.
    # Rename to "reference" names to exercise name mapping (as YuLan's reference names differ from ours).
    write_universal_checkpoint(root, trainer.model, optimizer, STEPS, rename=lambda n: "ref." + n)
    return root, trainer


def test_universal_checkpoint_roundtrip_without_deepspeed(universal):
    root, trainer = universal
    assert importlib.util.find_spec("deepspeed") is None  # reading must not need DeepSpeed
    assert "deepspeed" not in sys.modules

    saved = read_universal_checkpoint(root)  # via latest_universal
    assert saved.format == "deepspeed_universal" and saved.global_step == STEPS and saved.named
    assert saved.lr == pytest.approx(LR) and saved.param_groups[0]["initial_lr"] == pytest.approx(LR)

    model = tiny_llama(seed=1)
    optimizer = named_adamw(model)
    report = load_optimizer_state(root, model, optimizer, name_map=lambda n: n.removeprefix("ref."),
                                  load_master_weights=True)
    assert not report.missing and not report.unexpected and report.master_weights_loaded == len(report.loaded)
    assert report.renamed["model.embed_tokens.weight"] == "ref.model.embed_tokens.weight"
    assert_states_equal(optimizer, model, in_memory_states(trainer), STEPS)
    for (name, a), (_, b) in zip(model.named_parameters(), trainer.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # fp32 master weights, not the bf16 module copy


def test_universal_state_files_hold_the_saved_tensors(universal):
    """The reader returns exactly what the files hold (checked with a plain torch.load of one file)."""
    root, _ = universal
    folder = root / f"global_step{STEPS}_universal"
    name = "ref.model.layers.0.self_attn.q_proj.weight"
    direct = torch.load(folder / "zero" / name / "exp_avg_sq.pt", weights_only=True)["param"]
    saved = read_universal_checkpoint(folder)
    assert torch.equal(saved.params[name].exp_avg_sq, direct)
    assert saved.params[name].step == STEPS


def test_mismatched_names_are_reported_never_reinitialized(universal):
    root, _ = universal
    model = tiny_llama(seed=1)
    # without the name map nothing matches: strict refuses and lists both sides
    with pytest.raises(ValueError, match="model parameters without saved state") as error:
        load_optimizer_state(root, model, named_adamw(model))
    assert "ref.model.norm.weight" in str(error.value) and "model.norm.weight" in str(error.value)

    # a map that misses one parameter: strict=False loads the rest and names the one left fresh
    optimizer = named_adamw(model)
    name_map = lambda n: None if n.endswith("layers.1.mlp.up_proj.weight") else n.removeprefix("ref.")  # noqa: E731
    report = load_optimizer_state(root, model, optimizer, name_map=name_map, strict=False)
    assert report.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert report.unexpected == ["ref.model.layers.1.mlp.up_proj.weight"]
    assert "NO saved state" in report.summary()
    assert not optimizer.state[dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]]


def test_unsafe_pickles_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "exp_avg.pt"
    torch.save({"param": torch.zeros(2), "payload": Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open|builtins\.open"):
        safe_torch_load(path)
    assert not marker.exists()


def test_deepspeed_objects_are_inert_placeholders(universal):
    root, _ = universal
    common = safe_torch_load(root / f"global_step{STEPS}_universal" / "zero" / "optimizer_state.pt")
    scaler = common["loss_scaler"]
    assert scaler.pickled_name == "deepspeed.runtime.fp16.loss_scaler.LossScaler"
    assert scaler.state == {"cur_scale": 1.0, "dynamic": False}  # fields kept as data, no DeepSpeed code ran
    assert common["param_groups"][0]["lr"] == pytest.approx(LR)


def test_trainer_state_and_scheduler_files_agree(trained):
    checkpoint, _ = trained
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = read_optimizer_checkpoint(checkpoint)
    assert saved.global_step == state["global_step"] == STEPS
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert scheduler["_last_lr"] == pytest.approx(saved.group_lrs)
    assert os.path.getsize(checkpoint / "optimizer.pt") > 0
