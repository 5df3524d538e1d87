"""The least time the tiny quickstarts can take on this machine's CPU, against the time budgets of issues 13 and 19.

Each stage's matrix-multiply FLOPs are counted from its data and its config (`model_flops.projection_flops`: every
token through every projection and the LM head), and divided by the fastest matrix multiply this CPU runs, measured
here. That is a floor, not an estimate: attention scores, norms, the optimizer, sampling, data preparation, Python
and the installs are left out; a rejected answer or a sampled completion counts only its prompt's tokens; GRPO
counts the shortest prompts of its pool. A stage whose floor is over its budget cannot meet it on this CPU with
this recipe, however good the code; `measured` in the README over the floor is how far the code is from it.

    python -m benchmarks.cpu_floor --pairs outputs/quickstart/pairs/pairs.jsonl   # on-policy pairs of a quickstart
    python -m benchmarks.cpu_floor --write-results                                 # also append to RESULTS.md

Passes (one = a forward's matmuls): a full fine-tune's update is 3 (forward, gradients of activations and of
weights); LoRA's 2 plus the adapters; a frozen reference forward 1; sampling 1 over the prompt (prefill).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from benchmarks.model_flops import Shape, projection_flops
from benchmarks.models_and_data import RECIPE_CONFIGS, read_yaml
from benchmarks.reporting import append_results, environment, save_json
from yulan_tune.data.bundled import math_chat_conversations
from yulan_tune.data.chat import generation_prompt_ids, tokenize_conversation
from yulan_tune.data.curriculum import load_curriculum
from yulan_tune.data.math_problems import generate_problems, math_messages
from yulan_tune.data.preferences import PreferenceExample, load_preference_examples, math_preference_pairs
from yulan_tune.data.prompts import load_prompts
from yulan_tune.loading import load_tokenizer
from yulan_tune.quickstart import ON_POLICY_PAIRS
from yulan_tune.tiny import DEFAULT_PRETRAINING, build_tiny, tiny_curriculum
from yulan_tune.training.post_training import cpu_has_bf16_units

FULL_UPDATE, LORA_UPDATE, FORWARD = 3, 2, 1
# Time budgets of the issues, in seconds: make quickstart 5 min with the installs (issue 13), make dpo-quickstart
# 8 min after the installs (issue 13), make instruct-quickstart 15 min (issue 19), the tiny build ~90 s (issue 13).
BUDGETS = {"tiny build": 90, "make quickstart": 300, "make dpo-quickstart": 480, "make instruct-quickstart": 900}


def matmul_peak(dtype: torch.dtype, sizes: Sequence[int] = (1024, 2048, 3072), reps: int = 5) -> float:
    """The fastest square matrix multiply, in FLOP/s, over a few sizes (best of `reps` each)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: thread pool, packing buffers
        for _ in range(reps):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


@dataclass
class Stage:
    name: str
    tokens: int  # tokens through the model, each pass counted once
    passes: int

    def flops(self, shape: Shape) -> float:
        return projection_flops(shape, self.tokens) * self.passes


def pair_tokens(pairs: Sequence[PreferenceExample], tokenizer) -> int:
    """Tokens of a DPO pass over `pairs`: each chosen sequence whole, each rejected one as its prompt alone (the span
    trained of it may be one token)."""
    chosen = sum(len(tokenize_conversation(tokenizer, p.prompt + p.chosen).input_ids) for p in pairs)
    return chosen + sum(len(generation_prompt_ids(tokenizer, p.prompt)) for p in pairs)


def pair_stages(name: str, tokens: int, *, lora: bool) -> list[Stage]:
    """DPO: the policy's update over chosen and rejected sequences, the frozen reference's forward over both."""
    return [Stage(f"{name}: update", tokens, LORA_UPDATE if lora else FULL_UPDATE),
            Stage(f"{name}: reference", tokens, FORWARD)]


def quickstart_stages(tokenizer, pairs_file: str | None) -> dict[str, list[Stage]]:
    """Every stage of the three make targets, with the tokens of its data and config."""
    pretraining = DEFAULT_PRETRAINING  # rows of the curriculum's seq_len, as build_tiny runs them
    seq_len = load_curriculum(tiny_curriculum(pretraining.curriculum)).seq_len
    build = [Stage("tiny build", pretraining.steps * pretraining.batch_size * seq_len, FULL_UPDATE)]
    sft_config = read_yaml(RECIPE_CONFIGS / "tiny_full.yaml")
    sft_tokens = sum(min(len(tokenize_conversation(tokenizer, c).input_ids), sft_config["max_length"])
                     for c in math_chat_conversations(sft_config["num_bundled_examples"]))
    sft = [Stage("SFT", sft_tokens, FULL_UPDATE)]

    def prompt_tokens(prompts: Sequence[list[dict]]) -> list[int]:
        return [len(generation_prompt_ids(tokenizer, messages)) for messages in prompts]

    def scoring(n: int) -> Stage:  # greedy decoding: at least the prompt's forward
        held_out = [math_messages(p) for p in generate_problems(n, seed=0, split="test")]
        return Stage(f"score {n} held-out problems", sum(prompt_tokens(held_out)), FORWARD)

    pool, _ = load_prompts(ON_POLICY_PAIRS.prompts, num_bundled=ON_POLICY_PAIRS.num_bundled_prompts,
                           seed=ON_POLICY_PAIRS.seed)
    sampling = [Stage("sample on-policy pairs", ON_POLICY_PAIRS.samples * sum(prompt_tokens([p.prompt for p in pool])),
                      FORWARD)]
    on_policy = pair_tokens(load_preference_examples(pairs_file)[0] if pairs_file else [], tokenizer)
    dpo = pair_stages("DPO on-policy", on_policy, lora=False)
    lora_dpo = pair_stages("LoRA DPO on-policy", on_policy, lora=True)
    dpo_config = read_yaml(RECIPE_CONFIGS / "dpo_tiny.yaml")
    fixed = pair_stages("DPO fixed pairs", pair_tokens(math_preference_pairs(dpo_config["num_bundled_pairs"]),
                                                       tokenizer), lora=False)

    grpo_config = read_yaml(RECIPE_CONFIGS / "grpo_tiny.yaml")
    grpo_prompts, _ = load_prompts(grpo_config["dataset"], num_bundled=grpo_config["num_bundled_prompts"],
                                   first_bundled=grpo_config["first_bundled_prompt"], seed=grpo_config["seed"])
    grpo_pool = prompt_tokens([p.prompt for p in grpo_prompts])
    completions = grpo_config["max_steps"] * grpo_config["per_device_train_batch_size"]
    prompts = completions // grpo_config["num_generations"]
    shortest = sum(sorted(grpo_pool)[:prompts]) * grpo_config["num_generations"]
    reference = FORWARD if grpo_config.get("beta", 0) else 0
    grpo = [Stage("GRPO: sample (prefill)", shortest, FORWARD), Stage("GRPO: update", shortest, FULL_UPDATE),
            Stage("GRPO: reference", shortest, reference)]

    plan = {"tiny build": build,
            "make quickstart": build + sft + [scoring(200)] * 2}
    if pairs_file:
        # each DPO run scores its model and the SFT model on 1000 problems
        plan["make dpo-quickstart"] = plan["make quickstart"] + sampling + dpo + lora_dpo + [scoring(1000)] * 4
        # SFT, on-policy DPO, fixed-pair DPO and GRPO models scored once each
        plan["make instruct-quickstart"] = build + sft + sampling + dpo + fixed + grpo + [scoring(1000)] * 4
    return plan


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="the on-policy pairs of a quickstart run (pairs.jsonl); without it the "
                        "DPO and instruct quickstarts are left out")
    parser.add_argument("--write-results", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)

    tiny_dir = build_tiny()
    shape = Shape.of(AutoConfig.from_pretrained(tiny_dir))
    peaks = {"fp32": matmul_peak(torch.float32)}
    if cpu_has_bf16_units():
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    plan = quickstart_stages(load_tokenizer(tiny_dir), args.pairs)
    env = environment()
    peak_text = ", ".join(f"{dtype} {flops / 1e9:.1f} GFLOP/s" for dtype, flops in peaks.items())
    print(f"{env['device']}: fastest matrix multiply {peak_text}")
    rows, report = [], {"env": env, "peaks": peaks, "targets": {}}
    for target, stages in plan.items():
        flops = sum(stage.flops(shape) for stage in stages)
        floors = {dtype: flops / peak for dtype, peak in peaks.items()}
        report["targets"][target] = {"tflop": flops / 1e12, "floor_s": floors, "budget_s": BUDGETS[target],
                                     "stages": [(s.name, s.flops(shape) / 1e12) for s in stages]}
        floor_text = " / ".join(f"{seconds:.0f} s ({dtype})" for dtype, seconds in floors.items())
        verdict = "over" if min(floors.values()) > BUDGETS[target] else "within"
        print(f"{target}: {flops / 1e12:.1f} TFLOP of matmuls, floor {floor_text}, budget {BUDGETS[target]} s: "
              f"floor {verdict} budget")
        rows.append(f"| {env['date'][:10]} | {env['device']} | {target} | {flops / 1e12:.1f} | "
                    f"{peak_text} | {floor_text} | {BUDGETS[target]} s | {verdict} |")
    save_json(args.json, report)
    if args.write_results:
        append_results("cpu-floor", rows)


if __name__ == "__main__":
    main()
