"""Shared machinery of the benchmarks: benchmark data, per-step token counting, peak memory, FLOPs / MFU, and the
interleaved runner that turns repeated fresh-process runs into ratios.

How a comparison is measured (the issue's rule: ratios from one run, never one-off absolute times):
- every training run happens in a fresh subprocess (so its peak memory is its own), and the variants alternate
  A B, B A, A B, ... so that slow drifts of a shared machine hit both alike;
- inside a run the first `warmup_steps` optimizer steps are not timed; tokens are counted from the very batches
  the trainer consumed (the data collator's output), so each variant is credited with exactly what it trained;
- a comparison reports the median over repetitions of each variant's numbers and the median of the per-repetition
  ratios (candidate / baseline of the same repetition).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------- model shapes

# The released YuLan-Mini (yulan_reference.md 1.1): the "full-size" shape of the GPU runs, random init.
YULAN_MINI_SHAPE = dict(
    hidden_size=1920,
    num_hidden_layers=56,
    num_attention_heads=30,
    num_key_value_heads=6,
    intermediate_size=4800,
    vocab_size=99000,
)


# --------------------------------------------------------------------------------------------------- benchmark data


def _docstring_summary(docstring: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def code_function_chats(n: int, seed: int = 0, max_lines: int = 120) -> list[list[dict]]:
    """`n` code-writing conversations from the standard library's own functions: the user asks for a function by its
    signature and docstring summary, the assistant answers with its real source. Lengths vary from a few lines to
    `max_lines`, as real chat data does, so padding costs what it costs in practice."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, str, str]] = []  # (signature, summary, source)
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue  # a few stdlib files are not UTF-8 or not parseable by this interpreter: a sample is enough
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
                continue
            docstring = ast.get_docstring(node)
            if not docstring or not 3 <= node.end_lineno - node.lineno + 1 <= max_lines:
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
            signature = f"{node.name}({ast.unparse(node.args)})"
            candidates.append((signature, _docstring_summary(docstring), source))
        if len(candidates) >= 5 * n:
            break
    if len(candidates) < n:
        raise RuntimeError(f"found only {len(candidates)} documented stdlib functions under {stdlib}, need {n}")
    picked = random.Random(seed).sample(candidates, n)
    return [
        [
            {"role": "user", "content": f"Write the Python function `{signature}`: {summary}"},
            {"role": "assistant", "content": f"```python\n{source}\n```"},
        ]
        for signature, summary, source in picked
    ]


def sft_conversations(n: int, seed: int = 0, code_share: float = 0.5, max_lines: int = 120) -> list[list[dict]]:
    """The SFT benchmark set: bundled math conversations (short) mixed with stdlib code conversations (long)."""
    from yulan_tune.sft import math_sft_examples

    n_code = round(n * code_share)
    rows = math_sft_examples(n - n_code, seed) + code_function_chats(n_code, seed, max_lines)
    random.Random(seed).shuffle(rows)
    return rows


def _broken_function(source: str, rng: random.Random) -> str:
    """A plausible wrong answer: the function cut after a random share of its body, ending in `pass`."""
    lines = source.split("\n")
    keep = max(1, int(len(lines) * rng.uniform(0.2, 0.6)))
    indent = len(lines[min(1, len(lines) - 1)]) - len(lines[min(1, len(lines) - 1)].lstrip())
    return "\n".join(lines[:keep] + [" " * max(indent, 4) + "pass"])


def preference_rows(n: int, seed: int = 0, code_share: float = 0.5, max_lines: int = 40) -> list[dict]:
    """The DPO benchmark set in trl's conversational prompt / chosen / rejected form: the bundled math pairs (a
    correct vs a plausible wrong worked answer) mixed with code pairs (a stdlib function vs a truncated copy)."""
    from yulan_tune.data.preferences import math_preference_pairs

    n_code = round(n * code_share)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in math_preference_pairs(n - n_code, seed)]
    rng = random.Random(seed)
    for conversation in code_function_chats(n_code, seed + 1, max_lines):
        answer = conversation[1]["content"]
        source = answer.removeprefix("```python\n").removesuffix("\n```")
        rejected = f"```python\n{_broken_function(source, rng)}\n```"
        rows.append({"prompt": conversation[:1], "chosen": [conversation[1]],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[Any], key: str | None = None) -> Path:
    """One JSON object per line; with `key`, each row is wrapped as {key: row}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({key: row} if key else row, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------- counting what is trained


@dataclass
class BatchStats:
    trained_tokens: int  # positions whose next-token prediction enters the loss
    input_tokens: int  # non-pad tokens the model ran on (prompt tokens included)
    sequence_lengths: list[int]  # attention spans (documents) in the batch, for the attention FLOPs


def batch_stats(batch: dict[str, Any]) -> BatchStats:
    """What one collated batch trains, from the tensors the model receives.

    SFT / LM batches: `labels` (-100 = not trained; a row's first label is never predicted, so it is left out).
    DPO batches: `completion_mask` (every completion token is predicted from the token before it).
    Padded batches carry `attention_mask`; padding-free ones carry `position_ids` restarting at each document.
    """
    if "completion_mask" in batch:
        trained = int(batch["completion_mask"].sum())
    elif "labels" in batch:
        trained = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    else:
        raise KeyError(f"a batch needs 'labels' or 'completion_mask' to count trained tokens, got {sorted(batch)}")
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        lengths = [int(n) for n in batch["attention_mask"].sum(-1).flatten().tolist()]
    elif "position_ids" in batch:
        lengths = []
        for row in batch["position_ids"].reshape(-1, batch["position_ids"].shape[-1]):
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    else:
        ids = batch["input_ids"]
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    return BatchStats(trained, sum(lengths), lengths)


class CountingCollator:
    """Wraps a data collator and records the `BatchStats` of every batch it builds, in order.

    With one batch per optimizer step (gradient_accumulation_steps 1, dataloader_num_workers 0), batch i is the
    batch of step i; the dataloader may build one batch ahead, which the step window below never reads.
    """

    def __init__(self, collator: Callable[[list[dict]], dict[str, Any]]):
        self.collator = collator
        self.batches: list[BatchStats] = []

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        self.batches.append(batch_stats(batch))
        return batch


class StepClock:
    """Wall and process-CPU time at the end of every optimizer step (the GPU is synchronized first, so a step's
    time includes its kernels). Process CPU time sums all threads: on a shared CPU it is less disturbed by other
    processes than wall time, so it is reported beside it."""

    def __init__(self, synchronize: bool):
        self.synchronize = synchronize
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def trainer_step_callback(clock: StepClock) -> Any:
    """A transformers TrainerCallback that ticks `clock` at every optimizer step's end."""
    from transformers import TrainerCallback

    class _StepClockCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return _StepClockCallback()


@dataclass
class Measurement:
    """Counting and timing of one training run; `summary` turns them into the run's numbers."""

    device: str
    counter: CountingCollator | None = None
    clock: StepClock = field(default_factory=lambda: StepClock(False))
    batches: list[BatchStats] = field(default_factory=list)  # filled directly by loops without a collator

    def all_batches(self) -> list[BatchStats]:
        return self.counter.batches if self.counter is not None else self.batches

    def summary(self, warmup_steps: int) -> dict[str, Any]:
        """Numbers over steps warmup_steps+1 .. last: from the end of the last warmup step to the end of the run."""
        steps = len(self.clock.wall)
        if steps <= warmup_steps:
            raise RuntimeError(f"the run made {steps} optimizer steps, not more than warmup_steps={warmup_steps}")
        batches = self.all_batches()
        if len(batches) < steps:
            raise RuntimeError(f"{steps} steps but only {len(batches)} counted batches: is gradient accumulation or "
                               "a dataloader worker hiding batches from the counter?")
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be at least 1: the window starts at the end of the last warmup step")
        measured = batches[warmup_steps:steps]
        wall = self.clock.wall[-1] - self.clock.wall[warmup_steps - 1]
        cpu = self.clock.cpu[-1] - self.clock.cpu[warmup_steps - 1]
        trained = sum(b.trained_tokens for b in measured)
        processed = sum(b.input_tokens for b in measured)
        return {
            "steps_measured": steps - warmup_steps,
            "trained_tokens": trained,
            "input_tokens": processed,
            "wall_s": wall,
            "cpu_s": cpu,
            "trained_tokens_per_s": trained / wall,
            "input_tokens_per_s": processed / wall,
            "trained_tokens_per_cpu_s": trained / cpu if cpu else None,
            "sequence_lengths": [n for b in measured for n in b.sequence_lengths],
        }


def instrument_trainer(trainer: Any, device: str) -> Measurement:
    """Count the batches a transformers/trl Trainer trains on and time its steps, without changing what it does."""
    if trainer.args.gradient_accumulation_steps != 1 or trainer.args.dataloader_num_workers != 0:
        raise ValueError("benchmarks count one batch per step: use gradient_accumulation_steps 1 and "
                         "dataloader_num_workers 0")
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock(synchronize=device == "cuda")
    trainer.add_callback(trainer_step_callback(clock))
    return Measurement(device=device, counter=counter, clock=clock)


def measure_training(trainer: Any, device: str, warmup_steps: int) -> dict[str, Any]:
    """Train `trainer` once inside a fresh peak-memory window: the timing of the steps after `warmup_steps`, peak
    memory, and the precision / checkpointing / kernel options the run really used."""
    measurement = instrument_trainer(trainer, device)
    rss_before = current_rss_mib()
    reset_peak_memory(device)
    train_output = trainer.train()
    return {**measurement.summary(warmup_steps), **peak_memory(device), "rss_before_train_mib": rss_before,
            "train_loss": train_output.training_loss, "bf16": bool(trainer.args.bf16),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "liger": bool(trainer.args.use_liger_kernel), "torch_compile": bool(trainer.args.torch_compile),
            "param_dtype": str(next(trainer.model.parameters()).dtype)}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def full_size_llama_config(tokenizer: Any, shape: dict[str, int] | None = None) -> Any:
    """The released YuLan-Mini as a LlamaConfig (yulan_reference.md 1.1: q/k/v bias, untied head, head_dim 64,
    rope_theta 490000), with the tokenizer's special ids. `shape` overrides sizes (tests use a small one)."""
    from transformers import LlamaConfig

    shape = {**YULAN_MINI_SHAPE, **(shape or {})}
    return LlamaConfig(
        **shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"], hidden_act="silu",
        attention_bias=True, mlp_bias=False, rms_norm_eps=1e-6, rope_theta=490000.0, max_position_embeddings=28723,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )


def save_full_size_llama(out_dir: str | os.PathLike, shape: dict[str, int] | None = None) -> Path:
    """A randomly initialized YuLan-Mini-shaped Llama (bf16 safetensors) with the tiny YuLan tokenizer, which has
    YuLan-Mini's special ids; its 4096 tokens are a subset of the 99000-row vocabulary, and throughput does not
    depend on which ids are used. Initialized on the GPU when there is one (seconds instead of minutes)."""
    from transformers import LlamaForCausalLM

    from yulan_tune.modeling.tiny import build_tiny_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tiny_tokenizer(out)
    config = full_size_llama_config(tokenizer, shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's resident-set high-water mark (Linux
    resets VmHWM when 5 is written to /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not permitted: the window then starts at process start (ru_maxrss), said in the result


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory since `reset_peak_memory`: GPU bytes allocated by torch on CUDA, resident set size on CPU."""
    out = {"peak_rss_lifetime_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    out.setdefault("peak_rss_mib", out["peak_rss_lifetime_mib"])
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


# ------------------------------------------------------------------------------------------------------ FLOPs, MFU


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, heads=heads, kv_heads=config.num_key_value_heads or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def reference_training_flops(shape: Shape, sequence_lengths: Sequence[int], reference_forwards: int = 0) -> float:
    """Training FLOPs of sequences of the given lengths, by the formula of YuLan-Mini's own MFU estimate
    (`pretrain/scripts/estimate_mfu.py`, huyiwen/YuLan-Mini@5a4c9cc; the script yulan_reference.md 3.3 cites), per
    sequence of s tokens:

        E = 8 s l h^2 + 6 s l h f + 4 s^2 l h        (forward: attention projections, SwiGLU MLP, attention)
        F = 3 E + 4 s^2 l h + 6 s h V                (x3 forward + backward, attention recomputation, LM head)

    The script applies it to full 4096-token rows; here s is each attended span (a document of a packed row, the
    real tokens of a padded row), so padding and masked-off cross-document attention earn no FLOPs. DPO adds
    `reference_forwards` forward passes of a frozen reference model: E + 2 s h V each.
    8 s l h^2 counts K and V as h x h projections although with YuLan's GQA (6 KV heads of 30) they are 5x smaller,
    and the 4 s^2 l h recomputation term is work done twice: at 4096 tokens this formula credits 1.20x the FLOPs
    of `gqa_exact_training_flops`, and MFU by it reads 1.20x higher.
    """
    l, h, f, v = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    total = 0.0
    for s in sequence_lengths:
        forward = 8 * s * l * h**2 + 6 * s * l * h * f + 4 * s**2 * l * h
        total += 3 * forward + 4 * s**2 * l * h + 6 * s * h * v + reference_forwards * (forward + 2 * s * h * v)
    return total


def gqa_exact_training_flops(shape: Shape, sequence_lengths: Sequence[int], reference_forwards: int = 0) -> float:
    """The same accounting with the real projection sizes (q, o: h x heads*d; k, v: h x kv_heads*d) and without
    the recomputation term: 3 x forward matmul FLOPs + LM head, non-causal attention (the reference's convention)."""
    l, h, f, v = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    total = 0.0
    for s in sequence_lengths:
        forward = 2 * s * l * h * (2 * q + 2 * kv) + 6 * s * l * h * f + 4 * s**2 * l * q + 2 * s * h * v
        total += (3 + reference_forwards) * forward
    return total


# Dense bf16 tensor-core peak FLOP/s (vendor datasheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    for needle, flops in PEAK_BF16_FLOPS:
        if needle in device_name:
            return flops
    return None


def add_mfu(result: dict[str, Any], shape: Shape, device_name: str, peak_flops: float | None = None,
            reference_forwards: int = 0) -> None:
    """Add model FLOPs per second and MFU (reference formula, and the GQA-exact one) to a run's `result`."""
    lengths = result["sequence_lengths"]
    peak = peak_flops or peak_bf16_flops(device_name)
    for key, fn in (("reference", reference_training_flops), ("gqa_exact", gqa_exact_training_flops)):
        flops = fn(shape, lengths, reference_forwards)
        result[f"flops_per_s_{key}"] = flops / result["wall_s"]
        result[f"mfu_{key}"] = flops / result["wall_s"] / peak if peak else None
    result["peak_flops"] = peak


# ------------------------------------------------------------------------------------------- interleaved fresh runs


def run_worker(module: str, variant: str, settings: dict[str, Any], timeout: float, workdir: Path) -> dict[str, Any]:
    """Run `python -m module --worker variant --settings file --out file` in a fresh process; return its result."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings_file = workdir / f"settings-{variant}.json"
    settings_file.write_text(json.dumps(settings))
    out_file = Path(tempfile.mkstemp(prefix=f"{variant}-", suffix=".json", dir=workdir)[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    command = [sys.executable, "-m", module, "--worker", variant, "--settings", str(settings_file),
               "--out", str(out_file)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out_file.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def interleaved_order(variants: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """A B, B A, A B, ...: each repetition runs every variant once, alternating which goes first."""
    order = []
    for rep in range(reps):
        for variant in (variants if rep % 2 == 0 else list(reversed(variants))):
            order.append((rep, variant))
    return order


def run_interleaved(module: str, variants: Sequence[str], reps: int, settings: dict[str, Any], *, timeout: float,
                    workdir: Path, log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep, variant in interleaved_order(variants, reps):
        result = run_worker(module, variant, settings, timeout, workdir)
        result["rep"] = rep
        results[variant].append(result)
        log(f"  rep {rep} {variant:>12}: {result['trained_tokens_per_s']:9.1f} trained tok/s, "
            f"wall {result['wall_s']:6.2f} s over {result['steps_measured']} steps, "
            f"peak {memory_label(result)} (process {result['process_s']:.0f} s)")
    return results


def memory_label(result: dict[str, Any]) -> str:
    if "peak_gpu_mib" in result:
        return f"{result['peak_gpu_mib'] / 1024:.2f} GiB GPU"
    return f"{result['peak_rss_mib']:.0f} MiB RSS"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def compare(results: dict[str, list[dict[str, Any]]], candidate: str, baseline: str) -> dict[str, Any]:
    """Medians of each variant and the median of per-repetition ratios candidate / baseline."""
    def per_rep(variant: str, key: str) -> list[float]:
        return [r[key] for r in sorted(results[variant], key=lambda r: r["rep"])]

    def ratio(key: str) -> dict[str, float]:
        ratios = [c / b for c, b in zip(per_rep(candidate, key), per_rep(baseline, key))]
        return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}

    memory_key = "peak_gpu_mib" if "peak_gpu_mib" in results[candidate][0] else "peak_rss_mib"
    summary: dict[str, Any] = {"candidate": candidate, "baseline": baseline, "memory_key": memory_key,
                               "reps": len(results[candidate])}
    for variant in (candidate, baseline):
        summary[variant] = {key: median(per_rep(variant, key)) for key in
                            ("trained_tokens_per_s", "input_tokens_per_s", "wall_s", memory_key)}
        cpu_rates = per_rep(variant, "trained_tokens_per_cpu_s")
        if all(x is not None for x in cpu_rates):
            summary[variant]["trained_tokens_per_cpu_s"] = median(cpu_rates)
        mfu = per_rep(variant, "mfu_reference") if "mfu_reference" in results[variant][0] else []
        if mfu and all(x is not None for x in mfu):
            summary[variant]["mfu_reference"] = median(mfu)
            summary[variant]["mfu_gqa_exact"] = median(per_rep(variant, "mfu_gqa_exact"))
    summary["tokens_per_s_ratio"] = ratio("trained_tokens_per_s")
    summary["memory_ratio"] = ratio(memory_key)
    if "trained_tokens_per_cpu_s" in summary[candidate] and "trained_tokens_per_cpu_s" in summary[baseline]:
        summary["tokens_per_cpu_s_ratio"] = ratio("trained_tokens_per_cpu_s")
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    c, b = summary["candidate"], summary["baseline"]
    memory = summary["memory_key"]
    lines = [f"median of {summary['reps']} interleaved repetitions:"]
    for variant in (c, b):
        m = summary[variant]
        extra = f", MFU {100 * m['mfu_reference']:.1f}% (reference formula)" if "mfu_reference" in m else ""
        lines.append(f"  {variant:>12}: {m['trained_tokens_per_s']:10.1f} trained tok/s, {m['wall_s']:7.2f} s timed, "
                     f"{memory} {m[memory]:9.1f}{extra}")
    r = summary["tokens_per_s_ratio"]
    lines.append(f"  tokens/s ratio {c}/{b}: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    r = summary["memory_ratio"]
    lines.append(f"  {memory} ratio {c}/{b}: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    if "tokens_per_cpu_s_ratio" in summary:
        r = summary["tokens_per_cpu_s_ratio"]
        lines.append(f"  tokens per CPU-second ratio: {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    return "\n".join(lines)


def comparison_row(what: str, summary: dict[str, Any], env: dict[str, Any]) -> str:
    """One RESULTS.md row: candidate vs baseline medians, the median per-repetition ratio and its range."""
    c, b = summary[summary["candidate"]], summary[summary["baseline"]]
    key = summary["memory_key"]
    memory = "GPU" if key == "peak_gpu_mib" else "RSS"
    ratio, mem_ratio = summary["tokens_per_s_ratio"], summary["memory_ratio"]
    mfu = (f"{100 * c['mfu_reference']:.1f}% / {100 * b['mfu_reference']:.1f}%" if "mfu_reference" in c else "-")
    return (f"| {env['date'][:10]} | {env['device']} | {what} | {fmt(c['trained_tokens_per_s'])} / "
            f"{fmt(b['trained_tokens_per_s'])} | **{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
            f"{c[key] / 1024:.2f} / {b[key] / 1024:.2f} GiB {memory} ({mem_ratio['median']:.2f}x) | {mfu} | "
            f"{fmt(c['wall_s'])} / {fmt(b['wall_s'])} s | {versions_label(env)}; load {fmt(env['load_average_1min'])} |")


def single_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one variant's runs (no baseline)."""
    keys = ["trained_tokens_per_s", "wall_s", "peak_rss_mib"] + [
        k for k in ("peak_gpu_mib", "mfu_reference", "mfu_gqa_exact") if runs[0].get(k) is not None]
    return {"reps": len(runs), **{k: median([r[k] for r in runs]) for k in keys}}


def single_row(what: str, summary: dict[str, Any], env: dict[str, Any]) -> str:
    memory = (f"{summary['peak_gpu_mib'] / 1024:.2f} GiB peak GPU" if "peak_gpu_mib" in summary
              else f"{summary['peak_rss_mib'] / 1024:.2f} GiB peak RSS")
    mfu = f"{100 * summary['mfu_reference']:.1f}%" if summary.get("mfu_reference") is not None else "-"
    return (f"| {env['date'][:10]} | {env['device']} | {what}, {summary['reps']} runs | "
            f"{fmt(summary['trained_tokens_per_s'])} / - | - | {memory} | {mfu} | {fmt(summary['wall_s'])} s | "
            f"{versions_label(env)} |")


# ---------------------------------------------------------------------------------------------------- environment


def benchmark_arguments(description: str, *, reps: int, steps: int) -> argparse.ArgumentParser:
    """The arguments every comparison takes: the hidden worker protocol (`run_worker`), device, repetitions, steps,
    seed, per-run timeout and where results go. Each script adds its own on the returned parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=reps, help="repetitions of each variant, interleaved")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run, warmup included")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--json", help="write all runs and the summary to this file")
    parser.add_argument("--write-results", action="store_true", help="append a row to benchmarks/RESULTS.md")
    return parser


def report_comparison(args: argparse.Namespace, settings: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
                      candidate: str, baseline: str, table: str, describe: Callable[[dict[str, Any]], str]
                      ) -> dict[str, Any]:
    """Compare candidate with baseline, print the summary, append the RESULTS.md row of `table` (`describe(summary)`
    names the benchmark) when asked, save everything as JSON when asked; returns the summary."""
    env = environment()
    summary = compare(runs, candidate, baseline)
    print(summary_text(summary))
    if args.write_results:
        append_results(f"{table}-{args.device}", [comparison_row(describe(summary), summary, env)])
    save_json(args.json, {"settings": settings, "environment": env, "runs": runs, "summary": summary})
    return summary


def environment() -> dict[str, Any]:
    """Device, library versions, date and machine load: what a results row must say to be comparable."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.cuda.get_device_name()
    else:
        cpu_name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
        device = f"CPU {cpu_name}, {os.cpu_count()} cores"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {name: version(name) for name in
                     ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel")},
        "python": platform.python_version(),
    }


def versions_label(env: dict[str, Any]) -> str:
    v = env["versions"]
    parts = [f"torch {v['torch']}", f"transformers {v['transformers']}", f"trl {v['trl']}"]
    parts += [f"{name} {v[name]}" for name in ("peft", "bitsandbytes", "liger-kernel") if v.get(name, "-") != "-"]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- RESULTS.md


def append_results(section: str, rows: Sequence[str], path: Path = RESULTS_MD) -> None:
    """Insert markdown table rows just above the `<!-- rows:section -->` marker that closes that section's table."""
    marker = f"<!-- rows:{section} -->"
    text = path.read_text(encoding="utf-8")
    if marker not in text:
        raise ValueError(f"{path} has no {marker} line to append {section} rows above")
    text = text.replace(marker, "\n".join(rows) + "\n" + marker, 1)
    path.write_text(text, encoding="utf-8")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def save_json(path: str | os.PathLike | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))
