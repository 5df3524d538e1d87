"""On-policy preference data: `PairsConfig` + `PairsRecipe` (`yulan-tune pairs`).

    from yulan_tune import PairsConfig, PairsRecipe
    PairsRecipe(PairsConfig(model="outputs/quickstart/model", prompts="bundled:math_chat", out="pairs")).run()

YuLan-Mini-Instruct's DPO data holds 115K pairs sampled from its own SFT model, labelled by correctness where the
answer is verifiable and by a reward model otherwise (docs/yulan_reference.md section 6). This recipe does the same:
`samples` answers per prompt from the model (a `generation` backend: transformers, vLLM or an OpenAI-compatible
server), each labelled by

- the math verifier (`verifiers.math.verify_math`) where the prompt row has an `answer` (with `check_arithmetic`, a
  right final answer counts as right only when every equation the answer writes is true, `verifiers.arithmetic`;
  applied when the pairs are written, so rerunning with it relabels stored samples without sampling again),
- the code verifier (`verifiers.code.run_code_tests`, only with `allow_code_execution`) where it has `tests`,
- else the reward model (`reward_model`), higher score preferred;

and for each prompt with at least one preferred and one dispreferred answer, up to `pairs_per_prompt` chosen /
rejected pairs. Prompts that give no pair are counted by reason (all right, all wrong, tied scores, nothing to label
them with). Samples are written as they are drawn (`samples.jsonl`, one line per prompt), so a killed run resumes
where it stopped; `pairs.jsonl` (prompt / chosen / rejected messages) is what `yulan-tune dpo --dataset` reads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from yulan_tune.console import progress, write_metrics
from yulan_tune.data.prompts import PromptExample, load_prompts
from yulan_tune.data.records import check_bad_row_policy
from yulan_tune.evaluation.rewards import RewardModelScore, extract_program
from yulan_tune.generation import SamplingSettings, make_backend
from yulan_tune.tiny import resolve_tiny
from yulan_tune.verifiers.arithmetic import check_arithmetic
from yulan_tune.verifiers.math import verify_math

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
CONFIG_FILE = "pairs_config.json"
# what the samples already in samples.jsonl depend on: a resumed run must match them
SAMPLING_FIELDS = ("model", "prompts", "samples", "temperature", "top_p", "max_new_tokens", "seed", "backend",
                   "adapter", "num_bundled_prompts", "split")
# why a prompt gave no pair
NO_PAIR_REASONS = ("all_correct", "all_wrong", "tied_scores", "no_label", "one_sample")


@dataclass
class PairsConfig:
    model: str = "tiny"  # the SFT model to sample from (dir, hub id, 'tiny'); for backend openai: the served name
    prompts: str = "bundled:math_chat"  # prompt rows (prompt + answer / tests) or the bundled math problems
    out: str = "outputs/pairs"
    samples: int = 4  # answers per prompt (YuLan's PPO samples 4 per prompt)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    backend: str = "transformers"  # transformers | vllm | openai
    base_url: str | None = None  # for backend openai
    adapter: str | None = None  # a LoRA adapter on `model` (transformers backend)
    batch_size: int = 32  # sequences per generate call (transformers backend)
    chunk_prompts: int = 64  # prompts sampled between two appends to samples.jsonl (the resume granularity)
    reward_model: str | None = None  # labels prompts without a verifiable reference
    check_arithmetic: bool = False  # math: a right final answer with a false equation counts as wrong
    allow_code_execution: bool = False
    pairs_per_prompt: int = 1
    num_bundled_prompts: int = 1000
    on_bad_rows: str = "raise"
    split: str = "train"

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2 (a pair needs two answers), got {self.samples}")
        if self.pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be at least 1, got {self.pairs_per_prompt}")
        if self.chunk_prompts < 1:
            raise ValueError(f"chunk_prompts must be at least 1, got {self.chunk_prompts}")
        check_bad_row_policy(self.on_bad_rows)


@dataclass(frozen=True)
class Labelled:
    """The answers to one prompt with their labels: `correct` (verifiable) or `score` (reward model)."""

    texts: list[str]
    correct: list[bool] | None
    scores: list[float] | None
    how: str  # "math", "code", "reward_model" or "none"


def choose_pairs(labelled: Labelled, limit: int) -> tuple[list[tuple[str, str]], str | None]:
    """(chosen, rejected) texts for one prompt, and the reason when there are none.

    Verifiable: each right answer against a wrong one, right and wrong answers each used once (distinct texts
    first). Reward model: best against worst, next best against next worst, while the first scores higher.
    """
    if labelled.correct is not None:
        right = list(dict.fromkeys(t for t, ok in zip(labelled.texts, labelled.correct) if ok))
        wrong = list(dict.fromkeys(t for t, ok in zip(labelled.texts, labelled.correct) if not ok))
        if not wrong:
            return [], "all_correct"
        if not right:
            return [], "all_wrong"
        return list(zip(right, wrong))[:limit], None
    if labelled.scores is not None:
        ranked = sorted(zip(labelled.scores, labelled.texts), key=lambda pair: -pair[0])
        pairs = []
        for k in range(min(limit, len(ranked) // 2)):
            (high, best), (low, worst) = ranked[k], ranked[-1 - k]
            if high <= low or best == worst:
                break
            pairs.append((best, worst))
        return pairs, None if pairs else "tied_scores"
    return [], "no_label"


class PairsRecipe:
    """Prompts -> `samples` answers each (resumable) -> labels -> chosen / rejected pairs -> pairs.jsonl."""

    def __init__(self, config: PairsConfig):
        self.config = config
        self.model_path = resolve_tiny(config.model, "model") if config.backend != "openai" else config.model
        self.out = Path(config.out)
        self.backend: Any = None
        self.reward_model: RewardModelScore | None = None

    # labelling -------------------------------------------------------------------------------------------------------
    def label(self, prompt: PromptExample, texts: list[str]) -> Labelled:
        c = self.config
        if prompt.answer is not None:
            return Labelled(texts, [verify_math(t, prompt.answer).correct for t in texts], None, "math")
        if prompt.tests is not None and c.allow_code_execution:
            from yulan_tune.verifiers.code import run_code_tests

            return Labelled(texts, [run_code_tests(extract_program(t), prompt.tests).passed for t in texts], None,
                            "code")
        if self.reward_model is not None:
            scores = self.reward_model.scores([prompt.prompt] * len(texts), texts)
            return Labelled(texts, None, scores, "reward_model")
        return Labelled(texts, None, None, "none")

    def _check_same_run(self) -> None:
        """Resuming is only right for the same model, prompts and sampling: refuse to mix two runs' samples."""
        previous_file = self.out / CONFIG_FILE
        if not (self.out / SAMPLES_FILE).is_file() or not previous_file.is_file():
            return
        previous, current = json.loads(previous_file.read_text()), asdict(self.config)
        changed = [k for k in SAMPLING_FIELDS if previous.get(k) != current[k]]
        if changed:
            raise ValueError(f"{self.out / SAMPLES_FILE} holds samples of another run ({', '.join(changed)} differ: "
                             f"{ {k: previous.get(k) for k in changed} }); use another --out or delete it")

    # sampling (resumable) --------------------------------------------------------------------------------------------
    def _done(self) -> dict[int, dict]:
        """Prompts already sampled by an earlier run into samples.jsonl (a torn last line is dropped)."""
        path = self.out / SAMPLES_FILE
        done: dict[int, dict] = {}
        if not path.is_file():
            return done
        good = 0
        with path.open("rb") as handle:
            for raw in handle:
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break  # a run killed mid-write; everything before it is complete
                done[row["index"]] = row
                good += len(raw)
        if good != path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(good)
        return done

    def _sampler(self) -> Any:
        c = self.config
        if self.backend is None:
            options: dict[str, Any] = {}
            if c.backend == "transformers":
                options = {"adapter": c.adapter, "batch_size": c.batch_size}
            elif c.backend == "openai":
                options = {"base_url": c.base_url}
            self.backend = make_backend(c.backend, self.model_path, **options)
        return self.backend

    def run(self) -> dict[str, Any]:
        c = self.config
        started = time.time()
        prompts, report = load_prompts(c.prompts, on_bad_rows=c.on_bad_rows, split=c.split,
                                       num_bundled=c.num_bundled_prompts, seed=c.seed)
        if not prompts:
            raise ValueError(f"{c.prompts}: no usable prompts. {report.summary()}")
        if c.reward_model:
            self.reward_model = RewardModelScore(c.reward_model, clip=None)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_run()
        (self.out / CONFIG_FILE).write_text(json.dumps(asdict(c), indent=2) + "\n")
        done = self._done()
        resumed = len(done)
        todo = [i for i in range(len(prompts)) if i not in done]
        settings = SamplingSettings(n=c.samples, temperature=c.temperature, top_p=c.top_p,
                                    max_new_tokens=c.max_new_tokens, seed=c.seed)
        with (self.out / SAMPLES_FILE).open("a", encoding="utf-8") as samples_file, \
                progress(total=len(prompts), initial=resumed, desc="sampling", unit="prompt") as bar:
            for start in range(0, len(todo), c.chunk_prompts):
                chunk = todo[start:start + c.chunk_prompts]
                answers = self._sampler().generate([prompts[i].prompt for i in chunk], settings)
                for index, texts in zip(chunk, answers):
                    labelled = self.label(prompts[index], texts)
                    row = {"index": index, "prompt": prompts[index].prompt, "how": labelled.how, "samples": texts,
                           "correct": labelled.correct, "scores": labelled.scores}
                    samples_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[index] = row
                samples_file.flush()
                os.fsync(samples_file.fileno())
                bar.update(len(chunk))
        return self.write_pairs(prompts, done, resumed, report, started)

    def write_pairs(self, prompts: list[PromptExample], done: dict[int, dict], resumed: int, report: Any,
                    started: float) -> dict[str, Any]:
        c = self.config
        no_pair: Counter = Counter()
        labelled_by: Counter = Counter()
        n_pairs = correct = answered = false_steps = 0
        with (self.out / PAIRS_FILE).open("w", encoding="utf-8") as pairs_file:
            for index in range(len(prompts)):
                row = done[index]
                labelled = Labelled(row["samples"], row["correct"], row["scores"], row["how"])
                labelled_by[labelled.how] += 1
                if labelled.correct is not None:
                    correct += sum(labelled.correct)
                    answered += len(labelled.correct)  # the final answers' accuracy, before check_arithmetic
                if c.check_arithmetic and labelled.how == "math":
                    steps_true = [check_arithmetic(t).all_true for t in labelled.texts]
                    false_steps += sum(ok and not true for ok, true in zip(labelled.correct, steps_true))
                    strict = [ok and true for ok, true in zip(labelled.correct, steps_true)]
                    labelled = replace(labelled, correct=strict)
                pairs, reason = choose_pairs(labelled, c.pairs_per_prompt)
                if reason:
                    no_pair[reason] += 1
                for chosen, rejected in pairs:
                    pairs_file.write(json.dumps({
                        "prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], "labelled_by": labelled.how,
                    }, ensure_ascii=False) + "\n")
                    n_pairs += 1
        metrics = {"prompts": len(prompts), "samples_per_prompt": c.samples, "pairs": n_pairs,
                   "prompts_with_pair": len(prompts) - sum(no_pair.values()), "no_pair": dict(no_pair),
                   "labelled_by": dict(labelled_by), "sample_accuracy": correct / answered if answered else None,
                   "right_answer_false_equation": false_steps if c.check_arithmetic else None,
                   "resumed_prompts": resumed, "skipped_rows": dict(report.counts),
                   "seconds": round(time.time() - started, 1), "pairs_file": str(self.out / PAIRS_FILE)}
        write_metrics(self.out, metrics)
        return metrics
