"""What a person reads on the console: one line for a user error (exit status 2), progress bars, a short summary.

Every `yulan-tune` command and recipe script runs through `run_command`: an error the user can fix (a missing path,
a bad value, bad data) prints `<prog>: error: <one line>` on stderr and exits with 2; the traceback is shown only
with `yulan-tune --debug ...` or `YULAN_TUNE_DEBUG=1`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

DEBUG_ENV = "YULAN_TUNE_DEBUG"
METRICS_FILE = "yulan_tune_metrics.json"
# What a user fixes by changing a path, a value or the data. Our own error classes derive from these
# (DataFormatError, CurriculumError, ChatTemplateError: ValueError; ModelNotFoundError: FileNotFoundError).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
               NotImplementedError)

T = TypeVar("T")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line reports joined with ' | ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) if lines else type(error).__name__


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
                debug: bool = False) -> int:
    """Run a command's `main(argv)`, turning a user error into one line on stderr and exit status 2 (raised as it is
    with `debug` or YULAN_TUNE_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug or debug_enabled()
    configure_logging()
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)} [traceback: yulan-tune --debug, or {DEBUG_ENV}=1]", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a line is logged, not as it was when logging was set up: whoever captures
    stderr for a while (pytest, a notebook, a server) and then closes its stream would otherwise leave the handler
    writing to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def configure_logging() -> None:
    """Our messages as plain lines at INFO; libraries at WARNING (their per-step output is not for a person)."""
    if logging.getLogger("yulan_tune").handlers:
        return
    # bitsandbytes' CPU backend warns at import that it cannot fetch optional kernels from the hub (the `kernels`
    # package); peft imports bitsandbytes whenever it is installed, so every command would start with that line.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # trl's and peft's own code still reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    # FutureWarning on every DPO / GRPO / LoRA run: a note to those libraries, not to our user
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # transformers draws a bar for every save and load of a checkpoint ("Writing model shards", "Loading weights"):
    # instant for one shard, and interleaved with the training bar it repeats the bar on every save
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("yulan_tune")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug_enabled() else logging.INFO)
    logger.propagate = False


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar with ETA for a long step; off when `enabled` is false."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, **kwargs)


def elapsed(started: float) -> str:
    seconds = time.time() - started
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_metrics(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """The run's metrics as JSON in its output directory (the console gets a summary instead)."""
    path = Path(out_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def summary(prog: str, lines: Sequence[str]) -> None:
    """The short human summary a command ends with: what ran, where it was saved, the key numbers, the time. Printed
    by the main process only (`accelerate launch` sets RANK in every process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(f"{prog}: {line}" for line in lines), flush=True)


@contextlib.contextmanager
def quiet_logging(level: int = logging.WARNING) -> Iterator[None]:
    """Our INFO lines off for a nested step (the tiny build runs a whole pretraining; its bar is enough)."""
    logger = logging.getLogger("yulan_tune")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)
