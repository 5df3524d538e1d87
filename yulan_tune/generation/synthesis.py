"""`synth`: seed rows -> prompts (a template, or the row's own `messages`) -> several samples each from a backend ->
a verdict per sample -> resumable JSONL. Every sample is kept: accepted ones in `accepted.jsonl` (conversations,
ready for SFT), rejected ones in `rejected.jsonl` with the reason, both derived from `samples.jsonl`.

Verdicts by what the template asks for (`output:` in the template file):

- `solution` (math): the final answer against the seed's `answer` (`verifiers.verify_math`); with no `answer`,
  self-consistency: a sample is kept when its answer is the majority answer of the seed's samples and that majority
  holds at least `min_vote_share` of them (`verifiers.majority_answer`).
- `problem_and_solution` (math): the "[Problem]" / "[Solution]" layout and a final answer (nothing to check the
  answer against; the accepted conversation is the new problem and its solution).
- `program` (code): the last fenced code block run against the seed's `tests` (`verifiers.run_code_tests`), only when
  the user allowed code execution.
- `text` (rewrite): non-empty and not a copy of the seed text (content unchecked).

Resuming: samples are appended to `samples.jsonl` one seed at a time (all of a seed's samples in one write, a chunk of
seeds per flush); a restarted run drops a torn last line and a seed whose samples are incomplete, skips the seeds that
are done and generates the rest in the same order. Sampling is seeded per (conversation, sample) (`sample_seed`), so
the resumed file equals the one an uninterrupted run writes. `synth_run.json` records what the run was started with;
a restart with other settings, or with another prompt under a done seed's id, is refused instead of mixing two runs
in one file (the input may grow, or be cut with `max_seeds`, between runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yulan_tune.console import progress
from yulan_tune.data.formats import check_messages
from yulan_tune.data.records import (
    DataFormatError,
    Record,
    SkipReport,
    check_bad_row_policy,
    iter_records,
)
from yulan_tune.generation.backends import SamplingSettings
from yulan_tune.generation.templates import PromptTemplate, load_template
from yulan_tune.verifiers.code import run_code_tests
from yulan_tune.verifiers.math import answers_equivalent, extract_final_answer, is_ambiguous, verify_math
from yulan_tune.verifiers.vote import majority_answer

logger = logging.getLogger("yulan_tune.synth")

SAMPLES_FILE = "samples.jsonl"
ACCEPTED_FILE = "accepted.jsonl"
REJECTED_FILE = "rejected.jsonl"
RUN_FILE = "synth_run.json"
_PROBLEM_SOLUTION = re.compile(r"\[Problem\]\s*(.+?)\s*\[Solution\]\s*(.+?)\s*(?:<END>|$)", re.DOTALL)
_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass
class SynthesisConfig:
    task: str = "math"  # math | code | rewrite
    template: str | None = None  # a shipped template's name or a template file; None: the task's default
    n: int = 4  # samples per seed
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    chunk_size: int = 16  # seeds generated (and flushed to disk) together
    min_vote_share: float = 0.5  # self-consistency: the majority must hold at least this share of a seed's samples
    allow_code_execution: bool = False  # --task code runs generated programs: only when the user says so
    code_timeout_s: float = 5.0
    code_memory_mb: int = 512
    on_bad_rows: str = "raise"  # bad seed rows: stop at the first, or count and skip them
    max_seeds: int | None = None  # the first N seeds only

    def __post_init__(self) -> None:
        check_bad_row_policy(self.on_bad_rows)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if not 0 < self.min_vote_share <= 1:
            raise ValueError(f"min_vote_share must be in (0, 1], got {self.min_vote_share}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise ValueError(f"max_seeds must be at least 1, got {self.max_seeds}")
        self.sampling()  # validates n, temperature, top_p, max_new_tokens

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.n, self.temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass
class Seed:
    id: str
    prompt: list[dict]
    row: dict
    where: str

    @property
    def reference(self) -> str | None:
        answer = self.row.get("answer")
        return None if answer is None or answer == "" else str(answer)


@dataclass
class SynthesisResult:
    out_dir: Path
    seeds: int  # seeds in the input (after skipped rows)
    done_before: int  # seeds found complete in the output when the run started (resumed)
    generated: int  # seeds generated by this run
    samples: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    skipped: SkipReport = field(default_factory=SkipReport)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"], data["skipped"] = str(self.out_dir), self.skipped.to_dict()
        return data


# ------------------------------------------------------------------------------------------------ seeds


def _seed_from_record(record: Record, template: PromptTemplate, index: int) -> Seed:
    row = record.data
    seed_id = row.get("id")
    if seed_id is not None and not isinstance(seed_id, (str, int)):
        raise DataFormatError(record.where, f"expected a string or an integer, got {type(seed_id).__name__}",
                              field="id")
    seed_id = str(seed_id) if seed_id is not None else f"row-{index}"
    if row.get("messages") is not None:  # a ready prompt: its turns up to the last user turn
        messages = check_messages(row["messages"], record.where, "messages", require_assistant=False)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataFormatError(record.where, "expected at least one user turn", field="messages")
        prompt = messages
    else:
        prompt = template.render(row, record.where)
    if template.output == "program" and not str(row.get("tests") or "").strip():
        raise DataFormatError(record.where, "missing: --task code runs each sample against the row's tests "
                              "(Python statements such as asserts)", field="tests")
    return Seed(seed_id, prompt, row, record.where)


def read_seeds(source: str | os.PathLike | Sequence[dict], template: PromptTemplate, *, on_bad_rows: str = "raise",
               max_seeds: int | None = None) -> tuple[list[Seed], SkipReport]:
    """Seed rows from a file / directory (any `iter_records` source) or a list of dicts, as prompts."""
    report = SkipReport(on_bad_rows=check_bad_row_policy(on_bad_rows))
    if isinstance(source, (str, os.PathLike)):
        records: Iterable[Record] = iter_records(source, errors=report if on_bad_rows == "skip" else None)
    else:
        records = (Record("<seeds>", i, dict(row), unit="row") for i, row in enumerate(source))
    seeds: list[Seed] = []
    seen: dict[str, str] = {}
    for index, record in enumerate(records):
        if max_seeds is not None and len(seeds) >= max_seeds:
            break
        try:
            seed = _seed_from_record(record, template, index)
            if seed.id in seen:
                raise DataFormatError(record.where, f"duplicate id {seed.id!r} (first at {seen[seed.id]}); the output "
                                      "is keyed by id", field="id", reason="duplicate id")
        except DataFormatError as error:
            report.handle(error)
            continue
        seen[seed.id] = record.where
        seeds.append(seed)
    if not seeds:
        raise ValueError(f"{source if isinstance(source, (str, os.PathLike)) else 'the seeds'}: no usable seed rows"
                         + (f" ({report.summary()})" if report else ""))
    return seeds, report


# ------------------------------------------------------------------------------------------------ verdicts


def _verdict(accepted: bool, reason: str, detail: str, verifier: str, **extra: Any) -> dict[str, Any]:
    return {"accepted": accepted, "reason": reason, "detail": detail, "verifier": verifier, **extra}


def _math_solution_verdicts(seed: Seed, completions: list[str], min_share: float) -> list[dict]:
    reference = seed.reference
    if reference is not None:
        verdicts = []
        for completion in completions:
            verdict = verify_math(completion, reference)
            detail = f"answer {verdict.extracted!r}, reference {reference!r}" if verdict.extracted else "no final answer"
            verdicts.append(_verdict(verdict.correct, verdict.reason, detail, "reference answer",
                                     answer=verdict.extracted))
        return verdicts
    answers = [None if is_ambiguous(c) else extract_final_answer(c) for c in completions]
    if len(completions) < 2:
        return [_verdict(False, "single sample", "no reference answer, and one sample cannot be voted on (n >= 2)",
                         "vote", answer=answers[0])]
    majority, share = majority_answer(answers)
    verdicts = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            reason = "ambiguous answer" if is_ambiguous(completion) else "no answer"
            verdicts.append(_verdict(False, reason, "no single final answer", "vote", answer=None))
        elif share < min_share:
            verdicts.append(_verdict(False, "no majority", f"most common answer {majority!r} has {share:.2f} of the "
                                     f"votes < {min_share:.2f}", "vote", answer=answer))
        elif answers_equivalent(answer, majority):
            verdicts.append(_verdict(True, "majority", f"answer {answer!r} is the majority ({share:.2f})", "vote",
                                     answer=answer))
        else:
            verdicts.append(_verdict(False, "minority", f"answer {answer!r}, majority {majority!r} ({share:.2f})",
                                     "vote", answer=answer))
    return verdicts


def _problem_solution_verdict(completion: str) -> dict:
    match = _PROBLEM_SOLUTION.search(completion)
    if not match:
        return _verdict(False, "malformed", "no [Problem] ... [Solution] ... layout", "format")
    problem, solution = match.group(1).strip(), match.group(2).strip()
    answer = extract_final_answer(solution)
    if answer is None:
        return _verdict(False, "no answer", "the solution has no final answer", "format", problem=problem,
                        solution=solution)
    return _verdict(True, "well-formed", "problem and solution present (no reference to check the answer)",
                    "format", answer=answer, problem=problem, solution=solution)


def extract_program(completion: str) -> str:
    """The last ```python block (else the last fenced block of any language, else the whole text)."""
    blocks = _FENCE.findall(completion)
    python = [code for language, code in blocks if language.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else completion


def _program_verdict(seed: Seed, completion: str, config: SynthesisConfig) -> dict:
    program = extract_program(completion)
    verdict = run_code_tests(program, str(seed.row["tests"]), timeout_s=config.code_timeout_s,
                             memory_mb=config.code_memory_mb)
    return _verdict(verdict.passed, verdict.outcome, verdict.detail, "tests", program=program)


def _text_verdict(seed: Seed, completion: str) -> dict:
    text = completion.strip()
    if not text:
        return _verdict(False, "empty", "empty completion", "format")
    if text == str(seed.row.get("text", "")).strip():
        return _verdict(False, "copies the seed", "the completion repeats the seed text", "format")
    return _verdict(True, "rewritten", "non-empty and not a copy of the seed (content unchecked)", "format")


def judge(seed: Seed, completions: list[str], template: PromptTemplate, config: SynthesisConfig) -> list[dict]:
    """One verdict per completion of `seed` (a dict with accepted, reason, detail, verifier and extra fields)."""
    if template.output == "solution":
        return _math_solution_verdicts(seed, completions, config.min_vote_share)
    if template.output == "problem_and_solution":
        return [_problem_solution_verdict(c) for c in completions]
    if template.output == "program":
        return [_program_verdict(seed, c, config) for c in completions]
    return [_text_verdict(seed, c) for c in completions]


# ------------------------------------------------------------------------------------------------ resumable output


def _read_done(path: Path, n: int) -> tuple[dict[str, list[dict]], int]:
    """Complete seeds of `samples.jsonl` (id -> its rows) and the byte length of the file up to the last of them.
    A torn last line (a kill mid-write) and an incomplete last seed are left out: the caller truncates them off."""
    done: dict[str, list[dict]] = {}
    if not path.is_file():
        return done, 0
    data = path.read_bytes()
    offset, good_end = 0, 0
    block: list[dict] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if is_last:  # after the final newline: empty, or a line cut off mid-write
            break
        try:
            row = json.loads(raw)
            key, sample = row["seed_id"], row["sample"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a sample row of synth ({error}); the file is damaged: move it "
                             "away or use another --out") from error
        offset += len(raw) + 1
        if block and block[-1]["seed_id"] != key:
            raise ValueError(f"{path}:{number}: seed {block[-1]['seed_id']!r} has {len(block)} of {n} samples "
                             "before another seed starts; the file is damaged: move it away or use another --out")
        if sample != len(block):
            raise ValueError(f"{path}:{number}: sample {sample} of seed {key!r} out of order; the file is damaged")
        block.append(row)
        if len(block) == n:
            done[key] = block
            block, good_end = [], offset
    return done, good_end


def _write_jsonl_atomically(path: Path, rows: Iterable[dict]) -> None:
    staging = path.with_suffix(".tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    staging.replace(path)


def _identity(config: SynthesisConfig, template: PromptTemplate, backend: dict) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("chunk_size", "on_bad_rows", "max_seeds")}  # these never change a sample
    return {"settings": settings, "template": template.name,
            "template_sha256": hashlib.sha256(template.text.encode()).hexdigest(), "backend": backend}


def _check_done_seeds(path: Path, done: dict[str, list[dict]], seeds: list[Seed]) -> None:
    """The seeds found done must be the input's seeds of the same id, with the same prompt and reference (the input
    may have grown or been cut with --limit; it may not have changed under a done seed)."""
    by_id = {seed.id: seed for seed in seeds}
    for seed_id, rows in done.items():
        seed = by_id.get(seed_id)
        if seed is None:
            raise ValueError(f"{path} holds seed {seed_id!r}, which is not in the input; resume with the same seeds, "
                             "or use another --out")
        if rows[0]["prompt"] != seed.prompt or rows[0]["reference"] != seed.reference:
            raise ValueError(f"{path}: seed {seed_id!r} was sampled from another prompt or reference than the input's "
                             f"({seed.where}); resume with the same seeds, or use another --out")


def _check_identity(out: Path, identity: dict) -> None:
    path = out / RUN_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != identity:
            changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            if "settings" in changed:
                changed = [f"settings.{k}" for k in sorted(identity["settings"])
                           if stored.get("settings", {}).get(k) != identity["settings"].get(k)] + \
                          [k for k in changed if k != "settings"]
            raise ValueError(f"{out} holds a synth run started with other settings ({', '.join(changed)} differ); "
                             "resume with the same ones, or use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the run


class Synthesizer:
    """Runs one synthesis: `Synthesizer(config, backend).run(seeds, out_dir)`. `backend` is any object with
    `generate(conversations, settings)`; `backend_identity` (e.g. {"backend": "openai", "model": ...}) goes into
    the run's identity, so a resume against another model is refused."""

    def __init__(self, config: SynthesisConfig, backend: Any, *, backend_identity: dict | None = None) -> None:
        self.config = config
        self.backend = backend
        self.backend_identity = backend_identity or {"backend": type(backend).__name__}
        self.template = load_template(config.template, config.task)
        if self.template.output == "program" and not config.allow_code_execution:
            raise ValueError("--task code runs every generated program against the seed's tests; allow it with "
                             "--allow-code-execution (a subprocess with time and memory limits and no network)")

    def run(self, seeds: str | os.PathLike | Sequence[dict], out_dir: str | os.PathLike, *,
            show_progress: bool = True) -> SynthesisResult:
        started = time.time()
        config, out = self.config, Path(out_dir)
        seed_rows, skipped = read_seeds(seeds, self.template, on_bad_rows=config.on_bad_rows,
                                        max_seeds=config.max_seeds)
        _check_identity(out, _identity(config, self.template, self.backend_identity))
        samples_path = out / SAMPLES_FILE
        done, good_end = _read_done(samples_path, config.n)
        if samples_path.is_file() and samples_path.stat().st_size != good_end:
            logger.info("%s: dropping an incomplete last seed / torn line (%d bytes) and generating it again",
                        samples_path, samples_path.stat().st_size - good_end)
            with open(samples_path, "r+b") as handle:
                handle.truncate(good_end)
        _check_done_seeds(samples_path, done, seed_rows)
        todo = [seed for seed in seed_rows if seed.id not in done]
        settings = config.sampling()
        bar = progress(total=len(seed_rows), initial=len(seed_rows) - len(todo), desc="synth", unit="seed",
                       enabled=show_progress)
        with open(samples_path, "a", encoding="utf-8") as handle, bar:
            for start in range(0, len(todo), config.chunk_size):
                chunk = todo[start:start + config.chunk_size]
                completions = self.backend.generate([seed.prompt for seed in chunk], settings)
                lines = []
                for seed, texts in zip(chunk, completions):
                    for sample, (text, verdict) in enumerate(zip(texts, judge(seed, texts, self.template, config))):
                        row = {"id": f"{seed.id}#{sample}", "seed_id": seed.id, "sample": sample,
                               "task": config.task, "template": self.template.name, "prompt": seed.prompt,
                               "completion": text, "reference": seed.reference, **verdict}
                        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(chunk))
        return self._finish(out, seed_rows, len(done), len(todo), skipped, started)

    def _finish(self, out: Path, seeds: list[Seed], done_before: int, generated: int, skipped: SkipReport,
                started: float) -> SynthesisResult:
        done, _ = _read_done(out / SAMPLES_FILE, self.config.n)
        rows = [row for seed in seeds for row in done[seed.id]]
        _write_jsonl_atomically(out / ACCEPTED_FILE, (accepted_conversation(row) for row in rows if row["accepted"]))
        _write_jsonl_atomically(out / REJECTED_FILE, (row for row in rows if not row["accepted"]))
        accepted = sum(row["accepted"] for row in rows)
        reasons = Counter(row["reason"] for row in rows)
        return SynthesisResult(out, len(seeds), done_before, generated, len(rows), accepted, len(rows) - accepted,
                               dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))), skipped,
                               time.time() - started)


def accepted_conversation(row: dict) -> dict:
    """An accepted sample as an SFT conversation: the prompt and the completion (for a synthesized problem, the new
    problem as the user turn and its solution as the assistant turn)."""
    if "problem" in row and "solution" in row:
        messages = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
    else:
        messages = [*row["prompt"], {"role": "assistant", "content": row["completion"]}]
    return {"id": row["id"], "messages": messages}
