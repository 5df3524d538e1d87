"""muP parameter groups (docs/yulan_reference.md 3.2) and the hidden-state monitor (3.7)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM
from yulan_tune.training.monitor import HiddenStateMonitor
from yulan_tune.training.mup import mup_adamw, mup_param_groups

SHAPE = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, vocab_size=256, dim_model_base_lr=32)  # m_width = 4


def yulanmini(**overrides) -> YuLanMiniForCausalLM:
    torch.manual_seed(0)
    return YuLanMiniForCausalLM(YuLanMiniConfig.for_shape(**{**SHAPE, **overrides}))


def test_mup_groups_partition_the_parameters_with_the_reference_ratios():
    model = yulanmini()
    groups = mup_param_groups(model, lr=1e-2)
    assert [g["name"] for g in groups] == ["matrices", "embedding", "vectors"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["matrices"]["lr"] == pytest.approx(1e-2 / 4) and by_name["matrices"]["lr_scale"] == 0.25
    assert by_name["embedding"]["lr"] == by_name["vectors"]["lr"] == 1e-2
    assert all(g["weight_decay"] == 0.1 for g in groups)
    # every trainable parameter exactly once; the tied lm_head is the embedding
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    names = {g["name"]: g["param_names"] for g in groups}
    assert names["embedding"] == ["model.embed_tokens.weight"]
    assert len(names["matrices"]) == 7 * 3 and all(n.endswith("proj.weight") for n in names["matrices"])
    # per layer: 3 biases, 8 scalars, 2 norm weights; then the final norm, its scalar and lm_head_alpha
    assert len(names["vectors"]) == 13 * 3 + 3 and "lm_head_alpha" in names["vectors"]

    exempt = {g["name"]: g["weight_decay"] for g in mup_param_groups(model, lr=1e-2, decay_vectors=False)}
    assert exempt == {"matrices": 0.1, "embedding": 0.1, "vectors": 0.0}
    untied = {g["name"]: g["param_names"] for g in mup_param_groups(yulanmini(tie_word_embeddings=False), 1e-2)}
    assert "lm_head.weight" in untied["matrices"]  # an untied head is a hidden-LR matrix in the reference (3.2)


def test_first_adamw_step_moves_each_group_by_its_learning_rate():
    model = yulanmini(initializer_range=0.02)
    optimizer = mup_adamw(model, lr=1e-2, weight_decay=0.0)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-15
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    optimizer.step()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moved = (parameter.detach() - before[id(parameter)])[parameter.grad != 0].abs()
            # Adam's first update is lr * g / |g| (eps 1e-15): every element moves by exactly the group's lr
            torch.testing.assert_close(moved, torch.full_like(moved, group["lr"]), rtol=1e-3, atol=0)


def test_mup_groups_refuse_other_models_with_an_actionable_error():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=1, vocab_size=32))
    with pytest.raises(TypeError, match="from_llama"):
        mup_param_groups(llama, lr=1e-2)
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(yulanmini(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(TypeError, match="adapters"):
        mup_param_groups(adapted, lr=1e-2)


def expected_statistics(hidden_states: torch.Tensor) -> list[float]:
    x = hidden_states.double()
    return [x.pow(2).mean(-1).sqrt().mean().item(), x.var(-1).mean().item(), x.mean(-1).mean().item()]


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_monitor_logs_layer_statistics_through_the_trainer(tmp_path):
    model = yulanmini(initializer_range=0.02)
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [{"input_ids": ids, "labels": ids} for _ in range(16)]  # identical rows: every batch is the same
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=0.0, logging_steps=100, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
        activation_checkpointing=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    HiddenStateMonitor(every_n_steps=2).attach(trainer)
    recorder = RecordLogs()
    trainer.add_callback(recorder)  # after the monitor, like the reporting integrations
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "hidden_states_rms/layer_00" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # forced logs on monitored steps only
    assert sum("hidden_states_rms/layer_00" in logs for logs in recorder.logs) == 2
    # independent computation on the same batch (lr 0 keeps the weights; checkpoint recompute must not skew it)
    model.eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids, ids]), output_hidden_states=True).hidden_states
        layer = model.model.layers[1]
        attention_input = layer.input_layernorm(hidden[1]) * layer.input_layernorm_alpha
    expected = {"embed": expected_statistics(hidden[0]), "layer_00": expected_statistics(hidden[1]),
                "layer_01": expected_statistics(hidden[2])}
    for entry in logged:
        for key, values in expected.items():
            got = [entry[f"hidden_states_{s}/{key}"] for s in ("rms", "var", "mean")]
            assert got == pytest.approx(values, rel=1e-4, abs=1e-7), key
        got = [entry[f"attn_input_{s}/layer_01"] for s in ("rms", "var", "mean")]
        assert got == pytest.approx(expected_statistics(attention_input), rel=1e-4, abs=1e-7)
        assert "hidden_states_var/layer_02" in entry and "loss" in entry
    # and TensorBoard received them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = tmp_path.glob("runs/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/hidden_states_rms/layer_02")] == [2, 4]


def test_monitor_works_on_a_llama_without_a_trainer():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    monitor = HiddenStateMonitor(every_n_steps=1)
    monitor.install(llama)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        llama(ids)  # not collecting: the hooks do nothing
        monitor.start()
        hidden = llama(ids, output_hidden_states=True).hidden_states
        metrics = monitor.stop()
        attention_input = llama.model.layers[0].input_layernorm(hidden[0])
    assert sorted({name.split("/")[1] for name in metrics}) == ["embed", "layer_00", "layer_01"]
    assert len(metrics) == 3 * 3 + 3 * 2  # embed + 2 layer outputs + 2 attention inputs, 3 statistics each
    assert [metrics[f"hidden_states_{s}/layer_00"] for s in ("rms", "var", "mean")] == pytest.approx(
        expected_statistics(hidden[1]), rel=1e-5)
    assert [metrics[f"attn_input_{s}/layer_00"] for s in ("rms", "var", "mean")] == pytest.approx(
        expected_statistics(attention_input), rel=1e-5)
    monitor.remove()
    hooks = [hook for module in llama.modules() for hook in (*module._forward_hooks.values(),
                                                             *module._forward_pre_hooks.values())]
    assert not any(getattr(getattr(hook, "func", None), "__self__", None) is monitor for hook in hooks)
