"""SFT throughput and peak memory: yulan_tune's SFT recipe with its shipped defaults against a plain trl SFTTrainer
with trl's defaults, on the same model, data and hyperparameters (lr, batch size, steps, max_length).

    python -m benchmarks.sft_throughput                      # CPU: tiny YuLan, variable-length chat data
    python -m benchmarks.sft_throughput --device cuda        # GPU: full-size YuLan-Mini shape (random init), 4K
    python -m benchmarks.sft_throughput --device cuda --mode qlora --max-length 2048   # QLoRA peak memory

What each side runs:
- yulan_tune: `SFTRecipe` configured by the recipe YAML a user would start from (CPU: recipes/configs/
  tiny_full.yaml: bfd packing = padding-free per-document attention, fp32, no activation checkpointing; GPU:
  yulan_mini_instruct_full_80gb.yaml or yulan_mini_instruct_qlora_24gb.yaml), plus the GPU options when their
  packages are installed (Liger RMSNorm / SwiGLU / RoPE kernels; flash-attention 2), and torch.compile on request.
- trl: `trl.SFTTrainer(model=<path>, args=trl.SFTConfig(...))` on the conversational `messages` file with trl's own
  tokenization and defaults (fp32 weights, bf16 autocast, gradient checkpointing, no packing), `assistant_only_loss`
  on (the chat template carries {% generation %} markers) so that both train the assistant tokens only. On CPU
  `use_cpu=True` as well: without it trl's bf16 default stops with "Your setup doesn't support bf16/gpu. You need to
  assign use_cpu". With `--trl-setup tuned`, trl as a knowledgeable user sets it up on a CPU instead: fp32 (no bf16
  autocast), no activation checkpointing, and trl's own bfd packing with padding-free batches. `--trl-setup
  tuned-bf16`: the same with bf16 autocast on both sides (the recipe with `--bf16 true`), the fastest setup on a CPU
  with bf16 units (AVX512-BF16 / AMX), where it trains the tiny YuLan about 2x faster than fp32.
Only these are set alike on both sides: model, data file, learning rate, batch size, steps, max_length, seed,
gradient_accumulation_steps 1 (one batch per step, so steps can be credited with their batches), logging once at the
end, no checkpoints. Everything else is each side's default.

Counted: trained tokens (label != -100, the positions the loss is taken over) per second of the timed steps, wall
time, peak memory of the training window (RSS on CPU, torch.cuda.max_memory_allocated on GPU), and on GPU the MFU
by YuLan-Mini's own FLOP formula (benchmarks.model_flops.reference_training_flops).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/sft_throughput.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import benchmark_arguments, run_interleaved  # noqa: E402
from benchmarks.measurement import measure_training  # noqa: E402
from benchmarks.model_flops import Shape, add_mfu  # noqa: E402
from benchmarks.models_and_data import RECIPE_CONFIGS, default_model_dir, read_yaml, sft_conversations, write_jsonl  # noqa: E402
from benchmarks.reporting import append_results, environment, report_comparison, save_json, single_row, single_summary  # noqa: E402

MODULE = "benchmarks.sft_throughput"
CANDIDATE, BASELINE = "yulan_tune", "trl"


@dataclass
class SFTBenchSettings:
    device: str
    mode: str  # "full" or "qlora"
    model_dir: str
    data_file: str
    recipe_config: str
    max_length: int
    batch_size: int
    learning_rate: float
    steps: int
    warmup_steps: int
    seed: int = 0
    torch_compile: bool = False
    lora: dict[str, Any] = field(default_factory=dict)  # r / alpha / dropout of the recipe config, for the baseline
    trl_setup: str = "defaults"  # "defaults": trl's own; "tuned" / "tuned-bf16": what a knowledgeable user sets on a CPU


def gpu_options(device: str, torch_compile: bool) -> list[str]:
    """The recipe's GPU speed options that apply here: each only where its package is installed (none required)."""
    if device != "cuda":
        return []
    args = []
    # YULAN_BENCH_LIGER=0 turns Liger off (run_gpu.sh does so when its preflight finds the kernels broken)
    if importlib.util.find_spec("liger_kernel") is not None and os.environ.get("YULAN_BENCH_LIGER", "1") != "0":
        args += ["--use_liger_kernel", "true"]  # trl keeps its own fused LM head; Liger adds RMSNorm/SwiGLU/RoPE
    if importlib.util.find_spec("flash_attn") is not None:
        args += ["--attn_implementation", "flash_attention_2"]  # varlen kernels for the padding-free batches
    if torch_compile:
        args += ["--torch_compile", "true"]
    return args


def common_overrides(s: SFTBenchSettings, output_dir: str) -> list[str]:
    return ["--max_steps", str(s.steps), "--max_length", str(s.max_length),
            "--per_device_train_batch_size", str(s.batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(s.learning_rate), "--seed", str(s.seed), "--output_dir", output_dir,
            "--logging_steps", str(s.steps), "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def build_candidate(s: SFTBenchSettings, output_dir: str) -> Any:
    from yulan_tune.sft import SFTRecipe, parse_config

    argv = ["--config", s.recipe_config, "--model_name_or_path", s.model_dir, "--dataset", s.data_file,
            "--eval_math_problems", "0", *common_overrides(s, output_dir), *gpu_options(s.device, s.torch_compile),
            *(["--bf16", "true"] if s.trl_setup == "tuned-bf16" else [])]
    return SFTRecipe(parse_config(argv)).build_trainer()


def build_baseline(s: SFTBenchSettings, output_dir: str) -> Any:
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    dataset = load_dataset("json", data_files=s.data_file, split="train")
    peft_config, model_init_kwargs = None, None
    if s.mode == "qlora":  # trl's documented QLoRA: a 4-bit NF4 base loaded by the trainer, LoRA on all linears
        import torch
        from peft import LoraConfig
        from transformers import BitsAndBytesConfig

        model_init_kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)}
        peft_config = LoraConfig(r=s.lora["r"], lora_alpha=s.lora["alpha"], lora_dropout=s.lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    # "tuned" (CPU): fp32 instead of bf16 autocast (a CPU without bf16 matmul units runs it emulated), no activation
    # checkpointing (the tiny model fits; recomputing costs a forward), and trl's own bfd packing with padding-free
    # batches and per-document attention (no compute on padding): the recipe's own choices, made through trl
    tuned = dict(bf16=s.trl_setup == "tuned-bf16", activation_checkpointing=False, packing=True,
                 packing_strategy="bfd", padding_free=True) if s.trl_setup.startswith("tuned") else {}
    args = trl.SFTConfig(
        output_dir=output_dir, max_steps=s.steps, max_length=s.max_length, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1, learning_rate=s.learning_rate, seed=s.seed, logging_steps=s.steps,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        assistant_only_loss=True, model_init_kwargs=model_init_kwargs,
        # trl's bf16 default refuses to start on a CPU-only machine unless use_cpu is set (transformers' error asks
        # for exactly that), which keeps bf16 autocast on: what a user following the message runs
        use_cpu=s.device == "cpu", **tuned,
    )
    return trl.SFTTrainer(model=s.model_dir, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)


def worker(variant: str, settings_file: str, out_file: str) -> None:
    """One training run in this (fresh) process; writes its numbers to `out_file`."""
    s = SFTBenchSettings(**json.loads(Path(settings_file).read_text()))
    with tempfile.TemporaryDirectory(prefix=f"sft-bench-{variant}-") as output_dir:
        trainer = (build_candidate if variant == CANDIDATE else build_baseline)(s, output_dir)
        result = {"variant": variant, **measure_training(trainer, s.device, s.warmup_steps),
                  "padding_free": bool(getattr(trainer, "padding_free", False)),
                  "attn_implementation": trainer.model.config._attn_implementation}
        if s.device == "cuda" and s.mode == "full":
            import torch

            add_mfu(result, Shape.of(trainer.model.config), torch.cuda.get_device_name())
    Path(out_file).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------------ main


def prepare(args: argparse.Namespace, workdir: Path) -> SFTBenchSettings:
    """The model directory and the data file both sides read, and the settings every run gets."""
    model_dir = args.model_dir or default_model_dir(args.device, workdir)
    max_lines = 400 if args.device == "cuda" else 120  # GPU: long code conversations, up to ~4K tokens
    rows = sft_conversations(args.examples, seed=args.seed, max_lines=max_lines)
    data_file = write_jsonl(workdir / "sft_chat.jsonl", rows, key="messages")
    if args.device == "cuda":
        config = RECIPE_CONFIGS / ("yulan_mini_instruct_qlora_24gb.yaml" if args.mode == "qlora"
                                   else "yulan_mini_instruct_full_80gb.yaml")
    else:
        config = RECIPE_CONFIGS / ("tiny_qlora.yaml" if args.mode == "qlora" else "tiny_full.yaml")
    recipe_defaults = read_yaml(config)
    return SFTBenchSettings(
        device=args.device, mode=args.mode, model_dir=model_dir, data_file=str(data_file), recipe_config=str(config),
        max_length=args.max_length or recipe_defaults["max_length"],
        batch_size=args.batch_size or recipe_defaults["per_device_train_batch_size"],
        learning_rate=args.learning_rate or recipe_defaults["learning_rate"], steps=args.steps,
        warmup_steps=args.warmup_steps, seed=args.seed, torch_compile=args.torch_compile, trl_setup=args.trl_setup,
        lora={"r": recipe_defaults.get("lora_r", 16), "alpha": recipe_defaults.get("lora_alpha", 32),
              "dropout": recipe_defaults.get("lora_dropout", 0.05)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], reps=3, steps=12)
    parser.add_argument("--mode", choices=["full", "qlora"], default="full")
    parser.add_argument("--model-dir", help="model to train (default: tiny YuLan on CPU, full-size random on GPU)")
    parser.add_argument("--examples", type=int, default=600, help="conversations in the benchmark data")
    parser.add_argument("--max-length", type=int, help="default: the recipe config's")
    parser.add_argument("--batch-size", type=int, help="per-device batch size; default: the recipe config's")
    parser.add_argument("--learning-rate", type=float, help="default: the recipe config's")
    parser.add_argument("--torch-compile", action="store_true", help="GPU: also torch.compile the recipe's model")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the trl baseline (off: only the recipe, e.g. for QLoRA peak memory)")
    parser.add_argument("--trl-setup", choices=["defaults", "tuned", "tuned-bf16"], default="defaults",
                        help="trl baseline: its defaults, or tuned as a knowledgeable user would (fp32, no activation "
                             "checkpointing, bfd packing with padding-free batches); tuned-bf16: the same with bf16 "
                             "autocast on both sides")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.settings, args.out)
        return 0

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        settings = prepare(args, Path(tmp))
        print(f"SFT benchmark ({args.device}, {args.mode}): {json.dumps(asdict(settings))}")
        variants = [CANDIDATE, BASELINE] if args.baseline else [CANDIDATE]
        runs = run_interleaved(MODULE, variants, args.reps, asdict(settings), timeout=args.timeout,
                               workdir=Path(tmp) / "runs")
    if args.baseline:
        report_comparison(
            args, asdict(settings), runs, CANDIDATE, BASELINE, "sft",
            lambda summary: (f"SFT {settings.mode} vs trl {settings.trl_setup}, "
                             f"{'tiny YuLan' if settings.device == 'cpu' else 'YuLan-Mini shape'}"
                             f", max_length {settings.max_length}, batch {settings.batch_size}, "
                             f"{settings.steps - settings.warmup_steps} timed steps x {summary['reps']} reps"))
        return 0
    env = environment()
    summary = single_summary(runs[CANDIDATE])
    print(json.dumps(summary, indent=2))
    if args.write_results:
        append_results(f"sft-{args.device}", [single_row(
            f"SFT {args.mode} yulan_tune only, YuLan-Mini shape, max_length {settings.max_length}, batch "
            f"{settings.batch_size}", summary, env)])
    save_json(args.json, {"settings": asdict(settings), "environment": env, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
