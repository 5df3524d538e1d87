"""RL through trl's GRPOTrainer on the tiny YuLan: the reward terms on hand-written cases, the advantages and the KL
term against a direct computation, the adaptive KL controller against its formula, resume from a checkpoint, and
the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from yulan_tune.cli import main as cli_main
from yulan_tune.data.chat import end_of_turn_ids
from yulan_tune.data.math_problems import TRAIN_POOL
from yulan_tune.data.prompts import math_prompts
from yulan_tune.evaluation.rewards import (
    ArithmeticReward,
    CodeTestsReward,
    FormatReward,
    MathAnswerReward,
    MixedLanguagePenalty,
    OneSentencePenalty,
    TruncationPenalty,
    count_sentences,
)
from yulan_tune.grpo import GRPOConfig, GRPORecipe, parse_config
from yulan_tune.paths import RECIPES_DIR
from yulan_tune.training.kl_control import AdaptiveKLController

PROMPT = [{"role": "user", "content": "Ava has 3 apples and gets 4 more. How many apples does Ava have now?"}]
RIGHT = "3 + 4 = 7. The answer is 7."
WRONG = "3 + 4 = 8. The answer is 8."
MIXED = "3 加 4 等于 7。 So Ava has seven apples in total now. 答案是 7。"
EMPTY = ""
TRUNCATED = "3 + 4 = 7. Then we add the"
EOT, EOS, TOKEN = 106, 2, 50


def _turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_reward_terms_on_hand_written_cases() -> None:
    cases = [RIGHT, WRONG, TRUNCATED, MIXED, EMPTY]
    completions = [_turn(t) for t in cases]
    prompts = [PROMPT] * len(cases)
    ids = [[TOKEN, TOKEN, EOT], [TOKEN, EOS], [TOKEN, TOKEN, TOKEN], [TOKEN, EOT], [EOT]]
    answers = ["7"] * len(cases)
    # TRUNCATED has no stated answer, its last number (7) is right; MIXED states 7 in Chinese, last number 7
    assert MathAnswerReward()(prompts, completions, ids, answer=answers) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert MathAnswerReward()(prompts, completions, ids, answer=["", "7", "7", "7", "7"])[0] is None
    assert FormatReward()(prompts, completions, ids) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # the share of true equations; None where none is written (MIXED writes its sum in words)
    assert ArithmeticReward()(prompts, completions, ids) == [1.0, 0.0, 1.0, None, None]
    assert ArithmeticReward()([""], ["7 + 1 = 6. 6 + 2 = 8. The answer is 8."], None) == [0.5]
    assert TruncationPenalty([EOS, EOT])(prompts, completions, ids) == [0.0, 0.0, -1.0, 0.0, 0.0]
    assert MixedLanguagePenalty()(prompts, completions, ids) == [0.0, 0.0, 0.0, -1.0, 0.0]
    assert OneSentencePenalty()(prompts, [_turn("The answer is 7."), *completions], None) == [-1.0, 0.0, 0.0, 0.0,
                                                                                            0.0, -1.0]
    # plain-string completions (non-conversational data) read the same
    assert MathAnswerReward()([""], [RIGHT], None, answer=["7"]) == [1.0]


def test_penalty_rules_edge_cases(tiny_tokenizer) -> None:
    assert count_sentences("It costs 3.5 dollars. That is all") == 2  # a decimal point ends no sentence
    assert count_sentences("答案是七。对吗？") == 2
    # a Chinese answer naming one English term is not mixed (share 1/13 < 0.2); a translation prompt may mix
    assert MixedLanguagePenalty()([PROMPT], [_turn("我们可以用Python来计算这个问题")], None) == [0.0]
    translate = [{"role": "user", "content": "Translate 'good morning everyone' into Chinese: 大家早上好"}]
    assert MixedLanguagePenalty()([translate], [_turn("good morning everyone 是 大家早上好")], None) == [0.0]
    with pytest.raises(ValueError, match="min_share"):
        MixedLanguagePenalty(0.7)
    # without token ids, truncation is judged by length in tokens
    penalty = TruncationPenalty(end_of_turn_ids(tiny_tokenizer), tokenizer=tiny_tokenizer, max_tokens=8)
    assert penalty([PROMPT, PROMPT], [RIGHT * 3, "7."], None) == [-1.0, 0.0]


def test_code_reward_runs_tests_only_on_its_rows() -> None:
    program = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    rewards = CodeTestsReward(timeout_s=10)([PROMPT] * 3, [_turn(program), _turn(wrong), _turn(program)], None,
                                            tests=["assert add(2, 3) == 5", "assert add(2, 3) == 5", ""])
    assert rewards == [1.0, 0.0, None]


def _config(tiny_dir: Path, out: Path, **overrides) -> GRPOConfig:
    values = dict(model_name_or_path=str(tiny_dir), output_dir=str(out), num_bundled_prompts=16,
                  num_generations=4, per_device_train_batch_size=8, max_completion_length=12, max_steps=1,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  lr_scheduler_type="constant", warmup_steps=0, activation_checkpointing=False, seed=0,
                  temperature=1.0, rewards=["math", "format", "truncation", "one_sentence"],
                  reward_weights=[1.0, 0.5, 1.0, 0.25])
    values.update(overrides)
    return GRPOConfig(**values)


def _generation_batch(recipe: GRPORecipe, config: GRPOConfig) -> list[dict]:
    """The rows trl's sampler hands the trainer: each prompt `num_generations` times in a row."""
    dataset = recipe.trainer.train_dataset
    return [dict(dataset[i]) for i in range(config.per_device_train_batch_size // config.num_generations)
            for _ in range(config.num_generations)]


def test_advantages_and_kl_term_match_a_direct_computation(tiny_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_dir, tmp_path, beta=0.05)
    recipe = GRPORecipe(config)
    trainer = recipe.build_trainer()
    rows = _generation_batch(recipe, config)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)

    # rewards: our terms on the decoded completions, weighted; advantages: group-normalized (Bessel std, +1e-4)
    tokenizer = recipe.tokenizer
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    completions = [_turn(tokenizer.decode(i, skip_special_tokens=True)) for i in ids]
    prompts = [r["prompt"] for r in rows]
    terms = [MathAnswerReward()(prompts, completions, ids, answer=[r["answer"] for r in rows]),
             FormatReward()(prompts, completions, ids), TruncationPenalty(end_of_turn_ids(tokenizer))(
                 prompts, completions, ids), OneSentencePenalty()(prompts, completions, ids)]
    rewards = sum(w * torch.tensor(t) for w, t in zip(config.reward_weights, terms))
    groups = rewards.view(-1, config.num_generations)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(batch["advantages"], expected, atol=1e-5, rtol=1e-5)

    # move the policy off the reference so the KL is not zero, then compare trl's KL metric with k3 computed here
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop for each accumulation window
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].size(1)

    def token_logps(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -width - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)

    policy, reference = token_logps(trainer.model), token_logps(trainer.ref_model)
    mask = batch["completion_mask"].float()
    k3 = torch.exp(reference - policy) - (reference - policy) - 1
    direct_kl = (k3 * mask).sum() / mask.sum()
    assert direct_kl > 1e-4
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(direct_kl.item(), rel=1e-3)
    # on-policy (ratio 1), the DAPO loss is the token mean of -advantage + beta * k3
    direct_loss = ((-batch["advantages"].unsqueeze(1) + config.beta * k3) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(direct_loss.item(), rel=1e-3, abs=1e-6)


def test_adaptive_kl_controller_follows_its_formula() -> None:
    controller = AdaptiveKLController(0.01, target=0.06, horizon=10000)
    value = 0.01
    for kl, n in [(0.03, 128), (0.12, 128), (0.061, 512), (0.0, 64)]:
        error = max(-0.2, min(0.2, kl / 0.06 - 1))
        value *= 1 + error * n / 10000
        assert controller.update(kl, n) == pytest.approx(value, rel=1e-12)
    assert controller.samples_seen == 128 + 128 + 512 + 64
    restored = AdaptiveKLController(**controller.state()["args"])
    for name, attribute in controller.state()["attributes"].items():
        setattr(restored, name, attribute)
    assert restored.value == controller.value
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(0.0, 0.06)


def test_resume_from_the_last_complete_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    common = ["--model_name_or_path", str(tiny_dir), "--num_bundled_prompts", "16", "--num_generations", "4",
              "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--max_steps", "2",
              "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
              "--report_to", "none", "--disable_tqdm", "true", "--activation_checkpointing", "false",
              "--beta", "0.01", "--kl_target", "0.06", "--kl_horizon", "100", "--rewards", "one_sentence", "truncation",
              "math",
              "--lr_scheduler_type", "constant"]
    assert cli_main(["grpo", *common, "--output_dir", str(tmp_path / "full")]) == 0
    # a run stopped after its first checkpoint (the second checkpoint never got its completion record), resumed
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-1", resumed / "checkpoint-1")
    (resumed / "checkpoint-2").mkdir()  # torn: no completion record
    assert cli_main(["grpo", *common, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"]) == 0
    metrics = json.loads((resumed / "yulan_tune_metrics.json").read_text())
    assert metrics["resumed_from"] == str(resumed / "checkpoint-1")
    assert metrics["steps"] == 2
    full_metrics = json.loads((tmp_path / "full" / "yulan_tune_metrics.json").read_text())
    assert metrics["final_beta"] == pytest.approx(full_metrics["final_beta"], rel=1e-9)  # controller state restored
    assert full_metrics["final_beta"] != 0.01
    # every logged step records the coefficient the controller moved to from that step's KL (8 completions a step)
    history = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    beta = 0.01
    for log in [entry for entry in history if "loss" in entry]:
        beta *= 1 + max(-0.2, min(0.2, log["kl"] / 0.06 - 1)) * 8 / 100
        assert log["beta"] == pytest.approx(beta, rel=1e-9)
    assert beta == pytest.approx(full_metrics["final_beta"], rel=1e-9)
    from safetensors.torch import load_file

    full = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(resumed / "model.safetensors")
    halfway = load_file(tmp_path / "full" / "checkpoint-1" / "model.safetensors")
    for name in full:
        torch.testing.assert_close(again[name], full[name])
    assert any(not torch.equal(full[n], halfway[n]) for n in full)


def test_config_errors(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_code_execution"):
        _config(tiny_dir, tmp_path, rewards=["code"], reward_weights=None)
    with pytest.raises(ValueError, match="unknown terms"):
        _config(tiny_dir, tmp_path, rewards=["math", "style"], reward_weights=None)
    with pytest.raises(ValueError, match="reward_weights has 1 values"):
        _config(tiny_dir, tmp_path, reward_weights=[1.0])
    with pytest.raises(ValueError, match="initial beta"):
        _config(tiny_dir, tmp_path, kl_target=0.06, beta=0.0)
    with pytest.raises(ValueError, match="train problems 0..29999"):
        _config(tiny_dir, tmp_path, first_bundled_prompt=29990, num_bundled_prompts=16)


@pytest.mark.parametrize("name", ["grpo_tiny.yaml", "grpo_yulan_mini_instruct_80gb.yaml"])
def test_shipped_configs_parse(name: str) -> None:
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false"]  # the 80 GB config asks for bf16 autocast
    config = parse_config(["--config", str(RECIPES_DIR / "configs" / name), *cpu])
    assert config.kl_target == 0.06 and config.beta == 0.01
    assert len(config.reward_weights) == len(config.rewards) + bool(config.reward_model)


def test_bundled_prompts_can_start_after_the_ones_an_earlier_stage_used(tiny_dir: Path, tmp_path: Path) -> None:
    """`first_bundled_prompt` skips train problems, it does not draw other ones: rows 4000.. of the same sequence."""
    from yulan_tune.quickstart import ON_POLICY_PAIRS

    skipped = math_prompts(5, first=4000)
    drawn = math_prompts(4005)[4000:]
    assert [(p.prompt, p.answer, p.line) for p in skipped] == [(p.prompt, p.answer, p.line) for p in drawn]
    assert skipped[0].line == 4000
    recipe = GRPORecipe(_config(tiny_dir, tmp_path, first_bundled_prompt=4000, num_bundled_prompts=5))
    assert recipe.prepare_data()["prompt"] == [p.prompt for p in skipped]
    # the shipped tiny config's prompts are new to the model the instruct quickstart's DPO made, and exist
    shipped = parse_config(["--config", str(RECIPES_DIR / "configs" / "grpo_tiny.yaml")])
    assert shipped.first_bundled_prompt >= ON_POLICY_PAIRS.num_bundled_prompts
    assert shipped.first_bundled_prompt + shipped.num_bundled_prompts <= TRAIN_POOL
