"""A rejection-sampling round (rejection-sampling fine-tuning, RFT: Yuan et al. 2023, "Scaling Relationship on
Learning Mathematical Reasoning with Large Language Models"): sample several solutions per training problem from an
SFT model, keep those the math verifier accepts, fine-tune the same model on them, and measure held-out exact-match
before and after on the same problems (McNemar's exact test).

On the tiny default: the SFT model is the quickstart's (recipes/configs/tiny_full.yaml) unless one is given, the
training problems are the bundled train split (`data.math_problems`, problems the test split never repeats), and the
fine-tune is recipes/configs/rejection_sampling_tiny.yaml. Each stage leaves its output under `out_dir` and a rerun
reuses it: the sampling is a resumable `synth` run (generation.synthesis), so a killed round goes on where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from yulan_tune.console import quiet_logging
from yulan_tune.data.math_problems import generate_problems, math_messages, solutions
from yulan_tune.evaluation.exact_match import math_correct
from yulan_tune.evaluation.paired import compare_paired
from yulan_tune.generation.backends import TransformersBackend
from yulan_tune.generation.synthesis import ACCEPTED_FILE, SynthesisConfig, Synthesizer
from yulan_tune.loading import load_model, load_tokenizer
from yulan_tune.paths import RECIPES_DIR
from yulan_tune.sft import SFTRecipe
from yulan_tune.sft import parse_config as parse_sft_config
from yulan_tune.tiny import resolve_tiny
from yulan_tune.training.post_training import native_bf16_overrides

QUICKSTART_SFT_CONFIG = RECIPES_DIR / "configs" / "tiny_full.yaml"
ROUND_SFT_CONFIG = RECIPES_DIR / "configs" / "rejection_sampling_tiny.yaml"
TRAIN_FILE = "verified_train.jsonl"
logger = logging.getLogger("yulan_tune.rejection_sampling")


@dataclass
class RejectionSamplingConfig:
    out_dir: str = "outputs/rejection_sampling"
    sft_model: str | None = None  # the model to sample from; None: train the quickstart's SFT model into out_dir/sft
    train_problems: int = 4500  # the first N problems of the bundled train split (tiny_full.yaml trains on 10000)
    samples_per_problem: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 48  # the bundled solutions are under 40 tokens; exact-match generates 48 too
    eval_problems: int = 1000  # held-out test-split problems scored before and after
    sft_config: str = str(ROUND_SFT_CONFIG)  # the fine-tune on the verified samples
    sft_overrides: list[str] = field(default_factory=list)  # extra `--field value` arguments for that fine-tune
    batch_size: int = 64  # sequences sampled together
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_problems", "samples_per_problem", "eval_problems", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (greedy samples would all be the same), got "
                             f"{self.temperature}")


@dataclass
class RejectionSamplingResult:
    sft_model: str
    model_dir: str
    before: float
    after: float
    eval_problems: int
    newly_right: int
    newly_wrong: int
    mcnemar_p: float
    clustered_p: float  # McNemar's test with problems of the same worked solution as one cluster
    clusters: int  # distinct worked solutions among the held-out problems
    samples: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    problems_with_a_verified_sample: int
    train_rows: int  # distinct verified (problem, solution) pairs fine-tuned on
    sft: dict[str, Any]
    seconds: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sft(config_path: str, model: str, dataset: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    if (out / "config.json").is_file() and (out / "yulan_tune_metrics.json").is_file():
        return json.loads((out / "yulan_tune_metrics.json").read_text())  # done in an earlier run
    config = parse_sft_config(["--config", config_path, "--model_name_or_path", model, "--dataset", dataset,
                               "--output_dir", str(out), *overrides])
    return SFTRecipe(config).run()


def _distinct_verified(accepted_path: Path, train_path: Path) -> tuple[int, int]:
    """The accepted conversations without repeats (the same solution sampled twice for a problem counts once), as an
    SFT file; returns (rows, problems with at least one)."""
    seen: set[str] = set()
    problems: set[str] = set()
    rows = []
    for line in accepted_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = json.dumps(row["messages"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        problems.add(row["id"].rsplit("#", 1)[0])
        rows.append(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
    train_path.write_text("".join(rows), encoding="utf-8")
    return len(rows), len(problems)


def run_rejection_sampling(config: RejectionSamplingConfig, *, show_progress: bool = True) -> RejectionSamplingResult:
    started = time.time()
    seconds: dict[str, float] = {}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.sft_model is None:  # the quickstart's SFT model
        sft_model = str(out / "sft")
        with quiet_logging():
            _sft(str(QUICKSTART_SFT_CONFIG), resolve_tiny("tiny", "model"), "bundled:math_chat", Path(sft_model),
                 native_bf16_overrides())  # as the quickstart trains it
        seconds["sft_model"] = time.time() - started
    else:
        sft_model = resolve_tiny(config.sft_model, "model")
    tokenizer = load_tokenizer(sft_model)
    model = load_model(sft_model, dtype=torch.float32)
    test = generate_problems(config.eval_problems, config.seed, split="test")
    before = math_correct(model, tokenizer, test, show_progress=show_progress)
    seconds["evaluate_before"] = time.time() - started
    logger.info("held-out exact-match of %s on %d problems: %.3f", sft_model, len(test), sum(before) / len(test))

    problems = generate_problems(config.train_problems, config.seed, split="train")
    seeds = [{"id": f"train-{i}", "messages": math_messages(p), "answer": p.answer} for i, p in enumerate(problems)]
    synthesis = SynthesisConfig(task="math", n=config.samples_per_problem, temperature=config.temperature,
                                max_new_tokens=config.max_new_tokens, seed=config.seed, chunk_size=64)
    backend = TransformersBackend.from_model(model, tokenizer, batch_size=config.batch_size)
    sampled = Synthesizer(synthesis, backend, backend_identity={"backend": "transformers", "model": sft_model}).run(
        seeds, out / "samples", show_progress=show_progress)
    seconds["sample"] = time.time() - started
    del model, backend

    train_rows, covered = _distinct_verified(out / "samples" / ACCEPTED_FILE, out / TRAIN_FILE)
    if train_rows == 0:
        raise ValueError(f"no sample of {sft_model} was verified correct ({sampled.samples} samples); nothing to "
                         "fine-tune on (sample more, or at another temperature)")
    model_dir = out / "model"
    sft_metrics = _sft(config.sft_config, sft_model, str(out / TRAIN_FILE), model_dir, config.sft_overrides)
    seconds["fine_tune"] = time.time() - started
    after = math_correct(load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir), test,
                         show_progress=show_progress)
    seconds["evaluate_after"] = time.time() - started
    paired = compare_paired(before, after, clusters=solutions(test))
    return RejectionSamplingResult(
        sft_model=sft_model, model_dir=str(model_dir), before=paired.before, after=paired.after, eval_problems=paired.n,
        newly_right=paired.newly_right, newly_wrong=paired.newly_wrong, mcnemar_p=paired.mcnemar_p,
        clustered_p=paired.clustered_p, clusters=paired.clusters,
        samples=sampled.samples, accepted=sampled.accepted, rejected=sampled.rejected, reasons=sampled.reasons,
        problems_with_a_verified_sample=covered, train_rows=train_rows, sft=sft_metrics,
        seconds={k: round(v, 1) for k, v in seconds.items()})
