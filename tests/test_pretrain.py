"""PretrainRecipe end to end on a very tiny yulanmini: a run SIGKILLed at a random step in phase one, resumed across
the phase boundary, killed again in the middle of writing a checkpoint, and resumed once more ends with weights,
optimizer state and losses bitwise equal to an uninterrupted run; the uninterrupted run lowers held-out loss and logs
hidden-state statistics."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from yulan_tune.data.bundled import prepare_bundled_corpus
from yulan_tune.pretrain import PretrainConfig, PretrainRecipe
from yulan_tune.training.checkpoints import CHECKPOINT_COMPLETE, read_checkpoint_record

SEQ_LEN, BATCH, PHASE_STEPS, SAVE_STEPS = 64, 4, 8, 3
CURRICULUM = f"""seq_len: {SEQ_LEN}
phases:
  - name: code
    tokens: {{stdlib: {6 * BATCH * SEQ_LEN}, math: {2 * BATCH * SEQ_LEN}}}
  - name: math
    tokens: {{stdlib: {3 * BATCH * SEQ_LEN}, math: {5 * BATCH * SEQ_LEN}}}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    prepare_bundled_corpus(root / "data", tiny_dir, seq_len=SEQ_LEN, stdlib_docs=30, heldout_docs=4,
                           math_train=300, math_test=60)
    (root / "curriculum.yaml").write_text(CURRICULUM)
    return root


def make_config(workspace: Path, tiny_dir: Path, name: str) -> PretrainConfig:
    return PretrainConfig(
        output_dir=str(workspace / name), curriculum=str(workspace / "curriculum.yaml"),
        data_root=str(workspace / "data"), tokenizer=str(tiny_dir), seed=0,
        model_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
                      "intermediate_size": 128, "dim_model_base_lr": 64},
        per_device_train_batch_size=BATCH, warmup_steps=2, decay_steps=5, decay_shape="cos2", end_lr_factor=0.1,
        save_steps=SAVE_STEPS, keep_last_checkpoints=2, logging_steps=1, monitor_every_steps=2,
        eval_datasets=["stdlib-heldout", "math-test"], eval_rows=8, eval_strategy="steps", eval_steps=PHASE_STEPS,
        eval_on_start=True, report_to="tensorboard", use_cpu=True, disable_tqdm=True,
    )


@pytest.fixture(scope="module")
def single_thread():
    """Bitwise comparisons need the same reduction order in every process: one intra-op thread everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(workspace, tiny_dir, single_thread) -> dict:
    config = make_config(workspace, tiny_dir, "uninterrupted")
    given = config.to_dict()
    result = PretrainRecipe(config).run()
    assert config.to_dict() == given, "PretrainRecipe changed the config it was given"
    return result


class ReportStep(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        # write then rename: the parent polls the file and must never read it half-written (empty)
        partial = self.path.with_suffix(".partial")
        partial.write_text(str(state.global_step))
        os.replace(partial, self.path)


def _run_in_child(config: PretrainConfig, callbacks: list, kill_while_saving_step: int | None = None) -> None:
    torch.set_num_threads(1)
    if kill_while_saving_step is not None:
        # die in the middle of writing checkpoint-N's optimizer state: half the bytes on disk, then SIGKILL
        real_save = torch.save

        def save_then_die(obj, path, *args, **kwargs):
            if str(path).endswith(f"checkpoint-{kill_while_saving_step}/optimizer.pt"):
                real_save(obj, path, *args, **kwargs)
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *args, **kwargs)

        torch.save = save_then_die
    PretrainRecipe(config, callbacks=callbacks).run()
    os._exit(0)


def test_sigkill_at_random_step_and_while_saving_resumes_bitwise(workspace, tiny_dir, uninterrupted, single_thread):
    context = multiprocessing.get_context("fork")  # the child shares the imported libraries: no 10 s re-import
    config = make_config(workspace, tiny_dir, "killed")
    out = Path(config.output_dir)
    progress = workspace / "progress"

    # 1) SIGKILL from outside at a random step of phase one (after its first checkpoint)
    kill_at = random.SystemRandom().randint(SAVE_STEPS + 1, PHASE_STEPS - 1)
    print(f"killing at step {kill_at}")
    child = context.Process(target=_run_in_child, args=(config, [ReportStep(progress)]))
    child.start()
    deadline = time.monotonic() + 300
    while not (progress.exists() and int(progress.read_text()) >= kill_at):
        assert child.is_alive() and time.monotonic() < deadline, "the child stopped before the kill step"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    complete = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if read_checkpoint_record(p))
    assert complete and complete[-1] <= kill_at + 1 and not (out / "final").exists()

    # 2) resume: continues phase one, crosses into phase two, is killed while writing checkpoint-12
    child = context.Process(target=_run_in_child, args=(config, [], 12))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    partial = out / "checkpoint-12"
    assert (partial / "model.safetensors").exists() and not (partial / CHECKPOINT_COMPLETE).exists()
    assert read_checkpoint_record(out / "checkpoint-8")["keep"]  # the last checkpoint of phase one

    # 3) resume once more: the incomplete checkpoint is removed, the run continues from checkpoint-9
    result = PretrainRecipe(config).run()
    assert result["removed_incomplete"] == [str(partial)]
    assert result["resumed_from"] == str(out / "checkpoint-9") and result["phases_run"] == ["math"]
    assert result["global_step"] == 2 * PHASE_STEPS

    reference, resumed = Path(uninterrupted["final"]), Path(result["final"])
    weights, expected = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    end = f"checkpoint-{2 * PHASE_STEPS}"
    optimizer = torch.load(out / end / "optimizer.pt", weights_only=True)
    optimizer_expected = torch.load(reference.parent / end / "optimizer.pt", weights_only=True)
    for index, state in optimizer_expected["state"].items():
        for key, value in state.items():
            assert torch.equal(optimizer["state"][index][key], value), (index, key)
    logs = json.loads((out / end / "trainer_state.json").read_text())["log_history"]
    logs_expected = json.loads((reference.parent / end / "trainer_state.json").read_text())["log_history"]
    train_logs = {e["step"]: (e["loss"], e["learning_rate"]) for e in logs if "loss" in e}
    assert train_logs == {e["step"]: (e["loss"], e["learning_rate"]) for e in logs_expected if "loss" in e}
    assert len(train_logs) == 2 * PHASE_STEPS
    # rotation kept the 2 newest complete checkpoints and the last one of each phase
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-16", "checkpoint-8"]


def test_tiny_pretraining_lowers_held_out_loss_and_logs_hidden_states(uninterrupted):
    out = Path(uninterrupted["final"]).parent
    logs = json.loads((out / f"checkpoint-{2 * PHASE_STEPS}" / "trainer_state.json").read_text())["log_history"]
    # evaluated at the start of each phase and at its end; the run is deterministic, so are these numbers
    # (measured: stdlib-heldout 8.325 -> 7.993, math-test 8.325 -> 4.154)
    for name, drop in (("stdlib-heldout", 0.2), ("math-test", 2.0)):
        losses = [entry[f"eval_{name}_loss"] for entry in logs if f"eval_{name}_loss" in entry]
        print(name, [round(loss, 3) for loss in losses])
        assert losses[0] == pytest.approx(8.32, abs=0.05)  # ln(4096): the muP init predicts uniformly
        assert losses[-1] < losses[0] - drop
    monitored = [entry for entry in logs if "hidden_states_rms/layer_01" in entry]
    assert [entry["step"] for entry in monitored] == list(range(2, 2 * PHASE_STEPS + 1, 2))
    assert all(entry["attn_input_rms/layer_00"] > 0 for entry in monitored)
    # the same metrics reach TensorBoard
    events = b"".join(p.read_bytes() for p in out.rglob("events.out.tfevents*"))
    assert b"hidden_states_rms/layer_01" in events and b"train/loss" in events
    # the LR followed the WSD schedule: warmup 2 steps, stable, cos2 decay over the last 5 steps to 0.1 of the peak
    # (step k logs the factor its update used: lambda(k - 1); decay over steps 11-15 of 0..15)
    factors = {entry["step"]: entry["lr_factor"] for entry in logs if "lr_factor" in entry}
    expected = [0.0, 0.5] + [1.0] * 9 + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p / 5)) for p in range(5)]
    assert [factors[step] for step in range(1, 17)] == pytest.approx(expected, abs=1e-12)
    # rows past a phase's last whole step are counted in each checkpoint's record and in the run's metrics
    record = read_checkpoint_record(out / f"checkpoint-{2 * PHASE_STEPS}")
    assert record["dropped_rows"] == uninterrupted["dropped_rows"][record["phase"]] >= 0
    assert json.loads((out / "yulan_tune_metrics.json").read_text())["dropped_rows"] == uninterrupted["dropped_rows"]
    # both forms were written: the yulanmini model and its Llama conversion
    assert (out / "final" / "config.json").exists() and json.loads(
        (out / "final-llama" / "config.json").read_text())["model_type"] == "llama"


def test_pretrain_tiny_base_writes_the_quickstart_llama(tmp_path, tiny_dir):
    """The tiny base of the quickstart: a TINY_SHAPE yulanmini pretrained by this recipe, then converted to Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM
    from yulan_tune.tiny import TINY_SHAPE, TinyPretraining, pretrain_tiny_base

    out = pretrain_tiny_base(tmp_path / "tiny", tiny_dir, TinyPretraining(steps=4), seed=0)
    llama = AutoModelForCausalLM.from_pretrained(out)
    assert llama.config.model_type == "llama" and not llama.config.tie_word_embeddings
    assert {k: getattr(llama.config, k) for k in TINY_SHAPE} == TINY_SHAPE
    assert llama.config.rope_parameters["rope_theta"] == 490000.0 and llama.config.attention_bias
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert llama.generation_config.eos_token_id == [2, tokenizer.convert_tokens_to_ids("<|eot_id|>")] == [2, 106]
    # the Llama computes what the trained yulanmini computes
    trained = YuLanMiniForCausalLM.from_pretrained(out / "pretrain" / "run" / "final")
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (llama(ids).logits - trained(ids).logits).abs().max().item()
    assert difference < 1e-4
    # the tiny curriculum's two phases, scaled to the 4 steps asked for
    records = [read_checkpoint_record(out / "pretrain" / "run" / f"checkpoint-{step}") for step in (2, 4)]
    assert [(r["phase"], r["phase_steps"], r["keep"]) for r in records] == [("code", 2, True), ("math", 2, True)]


def test_tiny_build_key_follows_a_curriculum_file_by_content(tmp_path):
    """A curriculum given by path (how benchmarks/tiny_learning tries other mixes) keys the cache by its content."""
    from yulan_tune.tiny import TINY_CURRICULUM, TinyPretraining, default_tiny_dir, tiny_curriculum

    copy = tmp_path / "mix.yaml"
    copy.write_text(TINY_CURRICULUM.read_text())
    assert tiny_curriculum(str(copy)) == copy
    same = default_tiny_dir(pretraining=TinyPretraining(curriculum=str(copy)))
    copy.write_text(TINY_CURRICULUM.read_text().replace("96K", "128K"))
    assert default_tiny_dir(pretraining=TinyPretraining(curriculum=str(copy))) != same
    with pytest.raises(FileNotFoundError, match="no such curriculum file"):
        tiny_curriculum(str(tmp_path / "missing.yaml"))


def test_tiny_build_key_separates_a_bf16_build():
    """A bf16-autocast base is another model, so it gets another cache directory; the fp32 default keeps its own."""
    from yulan_tune.tiny import TinyPretraining, default_tiny_dir

    assert default_tiny_dir(pretraining=TinyPretraining(bf16=True)) != default_tiny_dir()
    assert default_tiny_dir(pretraining=TinyPretraining(bf16=False)) == default_tiny_dir()
