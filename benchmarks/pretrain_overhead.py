"""The training cost of the yulanmini architecture (muP multipliers, WeSaR scalars, z-loss) against a plain Llama of
the same size: same shape, same token rows, same steps, same training loop.

    python -m benchmarks.pretrain_overhead                 # CPU: the tiny YuLan shape, 8 x 256-token rows
    python -m benchmarks.pretrain_overhead --device cuda   # GPU: the full YuLan-Mini shape, 1 x 4096-token row

Both models are built from random init with tied embeddings (YuLan-Mini trains tied, docs/yulan_reference.md 1.2) and
the same sizes (hidden, layers, heads, KV heads, FFN, vocab; q/k/v bias). The loop is the plain one every
pretraining recipe runs: forward with labels (each model's own loss: yulanmini adds z-loss 1e-4, 1.3.5), backward,
clip to 1.0, AdamW step. yulanmini uses its muP parameter groups (training/mup.py, 3.2), Llama one group; both with
the reference's AdamW settings (3.1). GPU: fp32 master weights under bf16 autocast, fused AdamW, SDPA attention.
The rows are seeded random token ids: the cost of a step does not depend on which ids they are.
The target (issue 8): yulanmini at most 5% slower in tokens/s.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import benchmark_arguments, run_interleaved  # noqa: E402
from benchmarks.measurement import BatchStats, Measurement, StepClock, current_rss_mib, peak_memory, reset_peak_memory  # noqa: E402
from benchmarks.model_flops import Shape, add_mfu  # noqa: E402
from benchmarks.models_and_data import YULAN_MINI_SHAPE  # noqa: E402
from benchmarks.reporting import report_comparison  # noqa: E402

MODULE = "benchmarks.pretrain_overhead"
CANDIDATE, BASELINE = "yulanmini", "llama"
TINY_YULAN_SHAPE = dict(hidden_size=320, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=1,
                        intermediate_size=832, vocab_size=4096)  # yulan_tune.tiny.TINY_SHAPE


@dataclass
class PretrainBenchSettings:
    device: str
    shape: dict[str, int]
    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    learning_rate: float = 1e-2  # YuLan-Mini's peak (docs/yulan_reference.md 3.1); matrices at lr / m_width
    dim_model_base_lr: int = 256  # muP base width of the 2.42B run (1.2)
    seed: int = 0
    gradient_checkpointing: bool = False


def build_model(variant: str, s: PretrainBenchSettings) -> Any:
    """yulanmini (muP / WeSaR, tied) or a plain tied Llama of exactly the same sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM

    torch.manual_seed(s.seed)
    sizes = dict(s.shape, max_position_embeddings=max(4096, s.seq_len), pad_token_id=102, bos_token_id=1,
                 eos_token_id=2)
    if variant == CANDIDATE:
        config = YuLanMiniConfig.for_shape(dim_model_base_lr=s.dim_model_base_lr, **sizes)
        model_class = YuLanMiniForCausalLM
    else:
        config = LlamaConfig(**sizes, head_dim=s.shape["hidden_size"] // s.shape["num_attention_heads"],
                             hidden_act="silu", attention_bias=True, mlp_bias=False, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, rope_theta=10000.0)
        model_class = LlamaForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device(s.device):
        model = model_class(config)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build_optimizer(variant: str, model: Any, s: PretrainBenchSettings) -> Any:
    import torch

    from yulan_tune.training.mup import REFERENCE_BETAS, REFERENCE_EPS, REFERENCE_WEIGHT_DECAY, mup_adamw

    fused = {"fused": True} if s.device == "cuda" else {}
    if variant == CANDIDATE:
        return mup_adamw(model, s.learning_rate, **fused)
    return torch.optim.AdamW(model.parameters(), lr=s.learning_rate, betas=REFERENCE_BETAS, eps=REFERENCE_EPS,
                             weight_decay=REFERENCE_WEIGHT_DECAY, **fused)


def worker(variant: str, settings_file: str, out_file: str) -> None:
    import torch

    s = PretrainBenchSettings(**json.loads(Path(settings_file).read_text()))
    model = build_model(variant, s)
    optimizer = build_optimizer(variant, model, s)
    generator = torch.Generator().manual_seed(s.seed)
    rows = torch.randint(103, s.shape["vocab_size"], (s.steps, s.batch_size, s.seq_len), generator=generator)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device == "cuda" else nullcontext()
    measurement = Measurement(device=s.device, clock=StepClock(synchronize=s.device == "cuda"))
    rss_before = current_rss_mib()
    reset_peak_memory(s.device)
    losses = []
    for step in range(s.steps):
        batch = rows[step].to(s.device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        measurement.batches.append(BatchStats(trained_tokens=s.batch_size * (s.seq_len - 1),
                                              input_tokens=s.batch_size * s.seq_len,
                                              sequence_lengths=[s.seq_len] * s.batch_size))
        measurement.clock.tick()
        losses.append(loss.item() if step in (0, s.steps - 1) else None)
    result = {"variant": variant, **measurement.summary(s.warmup_steps), **peak_memory(s.device),
              "rss_before_train_mib": rss_before, "loss_first": losses[0], "loss_last": losses[-1],
              "parameters": sum(p.numel() for p in model.parameters()),
              "parameter_tensors": sum(1 for _ in model.parameters())}
    if s.device == "cuda":
        add_mfu(result, Shape.of(model.config), torch.cuda.get_device_name())
    Path(out_file).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], reps=5, steps=12)
    parser.add_argument("--seq-len", type=int, help="default: 256 on CPU, 4096 on GPU")
    parser.add_argument("--batch-size", type=int, help="rows per step; default: 8 on CPU, 1 on GPU")
    parser.add_argument("--shape", help="JSON of model sizes (default: tiny YuLan on CPU, YuLan-Mini on GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.settings, args.out)
        return 0

    gpu = args.device == "cuda"
    shape = json.loads(args.shape) if args.shape else (YULAN_MINI_SHAPE if gpu else TINY_YULAN_SHAPE)
    settings = PretrainBenchSettings(
        device=args.device, shape=shape, seq_len=args.seq_len or (4096 if gpu else 256),
        batch_size=args.batch_size or (1 if gpu else 8), steps=args.steps, warmup_steps=args.warmup_steps,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing)
    print(f"pretraining overhead benchmark ({args.device}): {json.dumps(asdict(settings))}")
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        runs = run_interleaved(MODULE, [CANDIDATE, BASELINE], args.reps, asdict(settings),
                               timeout=args.timeout, workdir=Path(tmp))
    summary = report_comparison(
        args, asdict(settings), runs, CANDIDATE, BASELINE, "pretrain",
        lambda summary: (f"pretrain step, {'tiny' if not gpu else 'YuLan-Mini'} shape, {settings.batch_size} x "
                         f"{settings.seq_len} tokens, {settings.steps - settings.warmup_steps} timed steps x "
                         f"{summary['reps']} reps"))
    overhead = 1 - summary["tokens_per_s_ratio"]["median"]
    print(f"  yulanmini training overhead vs Llama: {100 * overhead:+.1f}% tokens/s (target: at most 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
