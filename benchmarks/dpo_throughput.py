"""DPO throughput and peak memory: yulan_tune's `DPORecipe` with its defaults against a plain `trl.DPOTrainer` with
trl's defaults, on the same model, preference pairs and hyperparameters (lr, beta, batch size, steps, max_length).

    python -m benchmarks.dpo_throughput                 # CPU: tiny YuLan, math + code preference pairs
    python -m benchmarks.dpo_throughput --device cuda   # GPU: full-size YuLan-Mini shape (random init)

What each side runs:
- yulan_tune: `DPORecipe` from recipes/configs/dpo_tiny.yaml on CPU (fp32, no activation checkpointing), and from its
  dataclass defaults on GPU (bf16 weights, trl's activation checkpointing), with its own exact tokenization; a full
  fine-tune keeps a frozen reference copy, as trl does.
- trl: `trl.DPOTrainer(model=<path>, args=trl.DPOConfig(...))` on the conversational prompt / chosen / rejected
  file with trl's tokenization and defaults (fp32 weights, bf16 autocast, activation checkpointing; `use_cpu` on CPU,
  which trl's bf16 default requires there).
Pairs longer than max_length are removed from the file beforehand, so neither side drops nor truncates anything and
both train on exactly the same pairs. Trained tokens are the completion tokens (chosen and rejected) whose
log-probabilities enter the loss; each is counted once, although the reference model also scores it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import benchmark_arguments, run_interleaved  # noqa: E402
from benchmarks.measurement import measure_training  # noqa: E402
from benchmarks.model_flops import Shape, add_mfu  # noqa: E402
from benchmarks.models_and_data import RECIPE_CONFIGS, default_model_dir, preference_rows, read_yaml, write_jsonl  # noqa: E402
from benchmarks.reporting import report_comparison  # noqa: E402
from benchmarks.sft_throughput import gpu_options  # noqa: E402

MODULE = "benchmarks.dpo_throughput"
CANDIDATE, BASELINE = "yulan_tune", "trl"


# the recipe configs each side of the comparison starts from: full DPO of the real model on GPU, the tiny one on CPU
GPU_RECIPE_CONFIG = "dpo_yulan_mini_instruct_80gb.yaml"
CPU_RECIPE_CONFIG = "dpo_tiny.yaml"

@dataclass
class DPOBenchSettings:
    device: str
    model_dir: str
    data_file: str
    recipe_config: str | None
    max_length: int
    batch_size: int
    learning_rate: float
    beta: float
    steps: int
    warmup_steps: int
    seed: int = 0
    torch_compile: bool = False


def common_overrides(s: DPOBenchSettings, output_dir: str) -> list[str]:
    return ["--max_steps", str(s.steps), "--max_length", str(s.max_length),
            "--per_device_train_batch_size", str(s.batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(s.learning_rate), "--beta", str(s.beta), "--seed", str(s.seed),
            "--output_dir", output_dir, "--logging_steps", str(s.steps), "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def build_candidate(s: DPOBenchSettings, output_dir: str) -> Any:
    from yulan_tune.dpo import DPORecipe, parse_config

    argv = (["--config", s.recipe_config] if s.recipe_config else []) + [
        "--model_name_or_path", s.model_dir, "--dataset", s.data_file, "--eval_dataset", "",
        "--eval_math_problems", "0", *common_overrides(s, output_dir), *gpu_options(s.device, s.torch_compile)]
    return DPORecipe(parse_config(argv)).build_trainer()


def build_baseline(s: DPOBenchSettings, output_dir: str) -> Any:
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    dataset = load_dataset("json", data_files=s.data_file, split="train")
    args = trl.DPOConfig(
        output_dir=output_dir, max_steps=s.steps, max_length=s.max_length, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1, learning_rate=s.learning_rate, beta=s.beta, seed=s.seed,
        logging_steps=s.steps, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=s.device == "cpu",  # trl's bf16 default stops on a CPU-only machine without it
    )
    return trl.DPOTrainer(model=s.model_dir, args=args, train_dataset=dataset, processing_class=tokenizer)


def worker(variant: str, settings_file: str, out_file: str) -> None:
    s = DPOBenchSettings(**json.loads(Path(settings_file).read_text()))
    with tempfile.TemporaryDirectory(prefix=f"dpo-bench-{variant}-") as output_dir:
        trainer = (build_candidate if variant == CANDIDATE else build_baseline)(s, output_dir)
        result = {"variant": variant, **measure_training(trainer, s.device, s.warmup_steps),
                  "reference_model": trainer.ref_model is not None}
        if s.device == "cuda":
            import torch

            # policy forward + backward and one reference forward per sequence
            add_mfu(result, Shape.of(trainer.model.config), torch.cuda.get_device_name(),
                    reference_forwards=1 if trainer.ref_model is not None else 0)
    Path(out_file).write_text(json.dumps(result))


def pairs_within(rows: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """The pairs whose prompt + chosen and prompt + rejected both fit in max_length tokens (exact SFT rendering)."""
    from yulan_tune.data.chat import tokenize_conversation

    return [row for row in rows if all(
        len(tokenize_conversation(tokenizer, row["prompt"] + row[side]).input_ids) <= max_length
        for side in ("chosen", "rejected"))]


def prepare(args: argparse.Namespace, workdir: Path) -> DPOBenchSettings:
    from yulan_tune.loading import load_tokenizer

    model_dir = args.model_dir or default_model_dir(args.device, workdir)
    if args.device == "cuda":
        config = str(RECIPE_CONFIGS / GPU_RECIPE_CONFIG)
        defaults = {"max_length": 2048, "per_device_train_batch_size": 4, "learning_rate": 5e-7, "beta": 0.1}
        max_lines = 200
    else:
        config = str(RECIPE_CONFIGS / CPU_RECIPE_CONFIG)
        defaults = {"max_length": 256, "per_device_train_batch_size": 8, "learning_rate": 5e-5, "beta": 0.1}
        max_lines = 40
    defaults.update({k: v for k, v in read_yaml(config).items() if k in defaults})
    max_length = args.max_length or defaults["max_length"]
    rows = preference_rows(args.examples, seed=args.seed, max_lines=max_lines)
    kept = pairs_within(rows, load_tokenizer(model_dir), max_length)
    print(f"DPO data: {len(kept)} of {len(rows)} pairs fit max_length {max_length} (the rest are left out of the "
          "file for both sides)")
    data_file = write_jsonl(workdir / "dpo_pairs.jsonl", kept)
    return DPOBenchSettings(
        device=args.device, model_dir=model_dir, data_file=str(data_file), recipe_config=config,
        max_length=max_length, batch_size=args.batch_size or defaults["per_device_train_batch_size"],
        learning_rate=args.learning_rate or defaults["learning_rate"], beta=defaults["beta"], steps=args.steps,
        warmup_steps=args.warmup_steps, seed=args.seed, torch_compile=args.torch_compile)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], reps=3, steps=8)
    parser.add_argument("--model-dir", help="model to train (default: tiny YuLan on CPU, full-size random on GPU)")
    parser.add_argument("--examples", type=int, default=400, help="preference pairs generated (before the fit)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--torch-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.settings, args.out)
        return 0

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        settings = prepare(args, Path(tmp))
        print(f"DPO benchmark ({args.device}): {json.dumps(asdict(settings))}")
        runs = run_interleaved(MODULE, [CANDIDATE, BASELINE], args.reps, asdict(settings),
                               timeout=args.timeout, workdir=Path(tmp) / "runs")
    report_comparison(
        args, asdict(settings), runs, CANDIDATE, BASELINE, "dpo",
        lambda summary: (f"DPO full, {'tiny YuLan' if args.device == 'cpu' else 'YuLan-Mini shape'}, max_length "
                         f"{settings.max_length}, batch {settings.batch_size} pairs, "
                         f"{settings.steps - settings.warmup_steps} timed steps x {summary['reps']} reps"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
