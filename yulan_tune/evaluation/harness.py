"""Benchmarks through EleutherAI's lm-evaluation-harness (`lm_eval`), in-process, on a model loaded by our own loader.

`YuLanLM` is lm-eval's `HFLM` given the model object (`yulan_tune.loading.load_model`: yulanmini checkpoints natively,
a LoRA adapter unmerged, 4-bit) and our tokenizer (chat template guaranteed, pad != eos); its one override stops
generation at the end-of-turn tokens as `evaluation.exact_match` does. `run_tasks` resolves task names (lm-eval's own,
ours under `tasks/`, and the user's `--include-path` directories) through lm-eval's `TaskManager`, checks them before
any model work (unknown names, code-execution tasks, data that is not in the offline cache: one clear error each), and
runs `lm_eval.simple_evaluate` with per-sample records. Chat tasks (our bundled `yulan_math`) are rendered with the
model's chat template, the others as lm-eval renders them (plain text) unless `apply_chat_template` is asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Entry, Kind
from lm_eval.utils import handle_non_serializable
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from yulan_tune.data.chat import end_of_turn_ids

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MATH_TASK = "yulan_math"  # the bundled math problems (tasks/yulan_math)
SUITE = "yulan_mini"  # the YuLan-Mini report's benchmarks (tasks/yulan_mini)
CHAT_TASKS = frozenset({MATH_TASK})  # always rendered with the model's chat template
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"  # what the `evaluate` library's code_eval metric requires
RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"
_TASK_KINDS = (Kind.TASK, Kind.PY_TASK)


class UnknownTaskError(ValueError):
    pass


class CodeExecutionRefusedError(PermissionError):
    pass


class TaskDataNotCachedError(FileNotFoundError):
    pass


class BackendUnavailableError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------ the model


class YuLanLM(HFLM):
    """lm-eval's Hugging Face model around a model and tokenizer we loaded (lm-eval does no loading of its own)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int | str = 1,
                 max_batch_size: int = 64, max_length: int | None = None) -> None:
        with quiet_lm_eval():
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_batch_size=max_batch_size, max_length=max_length, trust_remote_code=False)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        # stop at EOS and <|eot_id|> as `exact_match.generate_answers` does, whatever the generation config says
        generation_kwargs.setdefault("eos_token_id", end_of_turn_ids(self.tokenizer))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailableError("--backend vllm needs vLLM, which is not installed here (`pip install vllm` on a "
                                      "Linux machine with a CUDA GPU); use --backend hf (the default)")


def vllm_lm(model_path: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
            adapter: str | os.PathLike | None = None, quantization: str | None = None,
            batch_size: int | str = "auto") -> Any:
    """lm-eval's vLLM model for a Llama-form checkpoint (vLLM loads it itself; a LoRA adapter is served unmerged)."""
    require_vllm()
    config = Path(model_path, "config.json")
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "yulanmini":
        raise BackendUnavailableError(f"{model_path} is a yulanmini-form checkpoint, which vLLM cannot load: export it "
                                      "first (`yulan-tune convert --to llama IN OUT`) or use --backend hf")
    if quantization not in (None, "4bit"):
        raise ValueError(f"--backend vllm supports --quantization 4bit (bitsandbytes) only, got {quantization!r}")
    from lm_eval.models.vllm_causallms import VLLM

    kwargs: dict[str, Any] = {"pretrained": str(model_path), "tokenizer": str(tokenizer_path or model_path),
                              "batch_size": batch_size, "trust_remote_code": False}
    if adapter is not None:
        kwargs.update(enable_lora=True, lora_local_path=str(adapter))
    if quantization == "4bit":
        kwargs["quantization"] = "bitsandbytes"
    with quiet_lm_eval():
        return VLLM(**kwargs)


# ------------------------------------------------------------------------------------------------ tasks


def _build_index(include_paths: tuple[str, ...], with_lm_eval_tasks: bool) -> TaskManager:
    with quiet_lm_eval():
        return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=with_lm_eval_tasks)


# Two caches, so that the cheap local indexes (~5 ms) of a long-lived process never evict a full one (~15 s).
@functools.lru_cache(maxsize=8)
def _local_index(include_paths: tuple[str, ...]) -> TaskManager:
    return _build_index(include_paths, with_lm_eval_tasks=False)


@functools.lru_cache(maxsize=4)
def _full_index(include_paths: tuple[str, ...]) -> TaskManager:
    return _build_index(include_paths, with_lm_eval_tasks=True)


def task_manager(include_path: Sequence[str | os.PathLike] | str | os.PathLike | None = None, *,
                 for_tasks: Sequence[str] | None = None) -> TaskManager:
    """lm-eval's task index over its own tasks, ours (`tasks/`) and `include_path` directories (built once each).

    Indexing lm-eval's own tasks parses ~14,000 YAML files (~15 s on 2 cores, in every process that evaluates). When
    every name in `for_tasks`, with every member of its groups, is a task or group of ours or of `include_path`, the
    index of those directories alone is returned: it resolves those names as the full one does, where they override
    lm-eval's own. Any other name gets the full index: lm-eval's tasks, tags (a tag gathers its tasks from every
    directory), and misspellings (their "did you mean" needs every name).
    """
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path}: no such directory (a directory of lm-eval task YAML files)")
    key = tuple(str(Path(p).resolve()) for p in paths)
    if for_tasks:
        local = _local_index(key)
        if all(defined_in(local, name) for name in for_tasks):
            return local
    return _full_index(key)


def defined_in(manager: TaskManager, name: str) -> bool:
    """`name` is a task of `manager`'s index, or a group of it whose members all are (recursively)."""
    entry = manager.task_index.get(name)
    if entry is None or entry.kind not in (*_TASK_KINDS, Kind.GROUP):
        return False
    if entry.kind in _TASK_KINDS:
        return True
    members = group_members(entry)
    return bool(members) and all(isinstance(m, str) and defined_in(manager, m) for m in members)


def group_members(entry: Entry) -> list[str | None]:
    """The names a group's `task:` list gives (None for an entry that names no task)."""
    items = (entry.cfg or {}).get("task", [])
    items = items if isinstance(items, list) else [items]
    return [i if isinstance(i, str) else i.get("task") if isinstance(i, dict) else None for i in items]


def leaf_tasks(manager: TaskManager, name: str) -> list[str]:
    """The tasks `name` (a task, group or tag) runs, read from the index alone: nothing is built or downloaded."""
    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint} (lm-eval's task names, {MATH_TASK}, {SUITE}, or a task "
                               "of your own in a directory given with --include-path)")
    if entry.kind in _TASK_KINDS:
        return [name]
    if entry.kind == Kind.TAG:
        return sorted(n for n, e in manager.task_index.items() if e.kind in _TASK_KINDS and name in e.tags)
    leaves: list[str] = []
    for child in group_members(entry):
        if isinstance(child, str):
            leaves += [leaf for leaf in leaf_tasks(manager, child) if leaf not in leaves]
    return leaves


def _leaf_config(manager: TaskManager, name: str) -> dict[str, Any]:
    entry = manager.task_index.get(name)
    return dict(entry.cfg or {}) if entry is not None else {}


def check_tasks(manager: TaskManager, names: Sequence[str], *, allow_code_execution: bool = False) -> dict[str, list[str]]:
    """name -> its tasks; unknown names and code-execution tasks without permission fail here, before any work."""
    if not names:
        raise ValueError("no task given (--tasks T1,T2)")
    resolved = {name: leaf_tasks(manager, name) for name in names}
    unsafe = sorted({leaf for leaves in resolved.values() for leaf in leaves
                     if _leaf_config(manager, leaf).get("unsafe_code")})
    if unsafe and not allow_code_execution:
        raise CodeExecutionRefusedError(f"{', '.join(unsafe)} run{'s' if len(unsafe) == 1 else ''} model-generated code: "
                                        "only with --allow-code-execution (ideally in a sandbox); or leave "
                                        f"{'it' if len(unsafe) == 1 else 'them'} out")
    return resolved


def _dataset_line(manager: TaskManager, task: str, error: BaseException) -> str:
    config = _leaf_config(manager, task)
    path, name = config.get("dataset_path"), config.get("dataset_name")
    spec = repr(path) + (f", {name!r}" if name else "")
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    where = f"offline ({'/'.join(offline)}=1)" if offline else "the hub is not reachable"
    return (f"task {task!r} needs the dataset {path!r}{f' (config {name!r})' if name else ''}, which is not in the "
            f"local datasets cache and {where} ({type(error).__name__}). Download it ahead of time on a machine "
            f"with hub access: `python -c \"import datasets; datasets.load_dataset({spec})\"` (or `huggingface-cli "
            f"download {path} --repo-type dataset`), with the same HF_HOME / HF_DATASETS_CACHE, then rerun")


def _is_data_error(error: BaseException) -> bool:
    """Errors of a dataset that cannot be fetched (offline, not cached, no such repo) rather than of the code."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    data_errors = (DatasetNotFoundError, OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError,
                   ConnectionError, FileNotFoundError)
    while error is not None:
        if isinstance(error, data_errors) or "offline" in str(error).lower() and "dataset" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def build_tasks(manager: TaskManager, names: Sequence[str], resolved: dict[str, list[str]]) -> list[Any]:
    """lm-eval's Task / Group objects for `names` (datasets are read here); a dataset that cannot be read offline is
    one clear error naming it."""
    built: list[Any] = []
    for name in names:
        try:
            with quiet_lm_eval():
                loaded = manager.load([name])
        except Exception as error:
            if not _is_data_error(error):
                raise
            for leaf in resolved[name]:  # which task's data is missing: build them one at a time
                try:
                    with quiet_lm_eval():
                        manager.load([leaf])
                except Exception as leaf_error:
                    if _is_data_error(leaf_error):
                        raise TaskDataNotCachedError(_dataset_line(manager, leaf, leaf_error)) from error
            raise
        group = loaded["groups"].get(name)
        built += [group] if group is not None else list(loaded["tasks"].values())
    return built


def task_texts(names: Sequence[str], *, include_path: Sequence[str | os.PathLike] | str | os.PathLike | None = None
               ) -> list[Any]:
    """Each evaluation document of the tasks `names` (tasks, groups or tags) as (prompt, reference) text
    (`data.cleaning.EvalText`), for the decontamination index of `yulan-tune clean`; data not in the offline cache is
    one clear error naming it."""
    from yulan_tune.data.cleaning import EvalText  # datatrove is imported only when cleaning

    manager = task_manager(include_path, for_tasks=names)
    resolved = check_tasks(manager, list(names), allow_code_execution=True)  # nothing is run: only the text is read
    leaves = sorted({leaf for group in resolved.values() for leaf in group})
    texts = []
    for task in build_tasks(manager, leaves, {leaf: [leaf] for leaf in leaves}):
        with quiet_lm_eval():
            docs = list(task.eval_docs)
        for doc in docs:
            query, target = task.doc_to_text(doc), task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
            if choices is not None and isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
            label = " ".join(map(str, target)) if isinstance(target, (list, tuple)) else str(target)
            texts.append(EvalText(f"lm-eval_{task.config.task}", str(query), label))
    return texts


# ------------------------------------------------------------------------------------------------ running


@dataclass
class MetricRow:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int | None
    is_group: bool = False


@dataclass
class EvalRun:
    """lm-eval's results (without the samples) and its per-sample records by task."""

    results: dict[str, Any]
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def rows(self) -> list[MetricRow]:
        rows = []
        n_samples = self.results.get("n-samples", {})
        for section, is_group in (("results", False), ("groups", True)):
            for task, values in self.results.get(section, {}).items():
                if is_group is False and task in self.results.get("groups", {}):
                    continue
                for key, value in values.items():
                    metric, comma, filter_name = key.partition(",")
                    if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                        continue
                    stderr = values.get(f"{metric}_stderr,{filter_name}")
                    name = metric if filter_name in ("none", "") else f"{metric} ({filter_name})"
                    n = n_samples.get(task, {}).get("effective")
                    rows.append(MetricRow(task, name, float(value),
                                          float(stderr) if isinstance(stderr, (int, float)) else None, n, is_group))
        return rows

    def metrics(self) -> dict[str, float]:
        """`task/metric` -> value: what the trainer logs and `yulan_tune_metrics.json` keeps."""
        return {f"{row.task}/{row.metric}": row.value for row in self.rows()}

    def per_sample(self, task: str, metric: str) -> dict[int, float]:
        """doc_id -> the task's per-sample value of `metric` (e.g. acc, exact_match)."""
        return {int(s["doc_id"]): float(s[metric]) for s in self.samples.get(task, [])
                if isinstance(s.get(metric), (int, float, bool))}


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval's and datasets' INFO/WARNING lines off (they are for lm-eval's own CLI); its request bars stay."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    previous = [logger.level for logger in loggers]
    bars = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, before in zip(loggers, previous):
            logger.setLevel(before)
        if bars:
            datasets.enable_progress_bars()


def _merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        elif key not in into:
            into[key] = value
    return into


@dataclass
class TaskPlan:
    """What `run_tasks` runs: lm-eval's built tasks in batches (chat-rendered or not) and the options they share.
    Building it reads the datasets, so a missing dataset fails before any model is loaded."""

    batches: list[tuple[list[Any], bool]]
    manager: TaskManager
    allow_code_execution: bool = False


def plan_tasks(
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    allow_code_execution: bool = False,
    apply_chat_template: bool = False,
) -> TaskPlan:
    """Check `tasks` (names, code-execution permission) and build them (datasets, offline cache) for `run_tasks`."""
    manager = task_manager(include_path, for_tasks=tasks)
    resolved = check_tasks(manager, list(tasks), allow_code_execution=allow_code_execution)
    chat = [n for n in tasks if n in CHAT_TASKS]
    plain = [n for n in tasks if n not in CHAT_TASKS]
    batches = [(build_tasks(manager, names, resolved), rendered)
               for names, rendered in ((chat, True), (plain, apply_chat_template)) if names]
    return TaskPlan(batches, manager, allow_code_execution)


def run_tasks(
    lm: Any,
    tasks: Sequence[str] | TaskPlan,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = True,
    **plan_options: Any,
) -> EvalRun:
    """Evaluate `lm` (a `YuLanLM`, or any lm-eval model) on `tasks` (names, or a `plan_tasks` plan) in this process.

    Global RNG states are left untouched (lm-eval's own seeding of random / numpy / torch is off; the few-shot sampler
    keeps its fixed seed), and a model in training mode is put back in training mode, so evaluating during training
    does not change the training run.
    """
    plan = tasks if isinstance(tasks, TaskPlan) else plan_tasks(tasks, **plan_options)
    model = getattr(lm, "_model", None)
    was_training = bool(getattr(model, "training", False))
    previous_code_env = os.environ.get(CODE_EVAL_ENV)
    if plan.allow_code_execution:
        os.environ[CODE_EVAL_ENV] = "1"
    merged: dict[str, Any] = {}
    samples: dict[str, list[dict]] = {}
    try:
        for built, chat in plan.batches:
            with quiet_lm_eval():
                results = simple_evaluate(
                    model=lm, tasks=built, num_fewshot=num_fewshot, limit=limit, task_manager=plan.manager,
                    log_samples=log_samples, apply_chat_template=chat, fewshot_as_multiturn=chat,
                    bootstrap_iters=bootstrap_iters, random_seed=None, numpy_random_seed=None,
                    torch_random_seed=None, confirm_run_unsafe_code=plan.allow_code_execution,
                )
            if results is None:  # not the main process
                continue
            samples.update(results.pop("samples", {}) or {})
            _merge(merged, results)
    finally:
        if model is not None and hasattr(model, "train"):
            model.train(was_training)
        if plan.allow_code_execution:
            if previous_code_env is None:
                os.environ.pop(CODE_EVAL_ENV, None)
            else:
                os.environ[CODE_EVAL_ENV] = previous_code_env
    return EvalRun(merged, samples)


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
                   batch_size: int | str = 1, **options: Any) -> EvalRun:
    """`run_tasks` on a model object (see `YuLanLM`)."""
    return run_tasks(YuLanLM(model, tokenizer, batch_size=batch_size), tasks, **options)


# ------------------------------------------------------------------------------------------------ saving


def write_run(out_dir: str | os.PathLike, run: EvalRun) -> Path:
    """`results.json` (lm-eval's results) and `samples/<task>.jsonl` (its per-sample records) in `out_dir`."""
    out = Path(out_dir)
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(run.results, indent=2, default=handle_non_serializable) + "\n",
                                    encoding="utf-8")
    for task, records in run.samples.items():
        with open(out / SAMPLES_DIR / f"{task}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, default=handle_non_serializable) + "\n")
    return out / RESULTS_FILE


def read_run(out_dir: str | os.PathLike) -> EvalRun:
    """A run written by `write_run`."""
    out = Path(out_dir)
    if not (out / RESULTS_FILE).is_file():
        raise FileNotFoundError(f"{out}: no {RESULTS_FILE} (not the output directory of `yulan-tune eval --tasks`)")
    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    samples = {path.stem: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
               for path in sorted((out / SAMPLES_DIR).glob("*.jsonl"))}
    return EvalRun(results, samples)


def format_table(rows: Sequence[MetricRow]) -> list[str]:
    """A short fixed-width table: task, metric, value (± stderr), n."""
    if not rows:
        return []
    width = max(len(r.task) + (2 if r.is_group else 0) for r in rows)
    metric_width = max(len(r.metric) for r in rows)
    lines = [f"{'task':<{width}}  {'metric':<{metric_width}}  {'value':>8}  {'± stderr':>9}  {'n':>6}"]
    for row in rows:
        stderr = f"{row.stderr:.4f}" if row.stderr is not None and math.isfinite(row.stderr) else "-"
        name = f"[{row.task}]" if row.is_group else row.task
        lines.append(f"{name:<{width}}  {row.metric:<{metric_width}}  {row.value:>8.4f}  {stderr:>9}  "
                     f"{row.n if row.n is not None else '-':>6}")
    return lines


def default_batch_size() -> int | str:
    return "auto" if torch.cuda.is_available() else 8
