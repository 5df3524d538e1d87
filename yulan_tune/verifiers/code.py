"""Running a candidate program against its tests, with limits: the code verifier.

Each call writes the program and its tests into a fresh temporary directory and runs `_sandbox_runner.py` there in a
new process under `python -I` (isolated: no user site-packages, no PYTHON* variables, neither the working directory
nor the script's directory on sys.path), with an empty environment, stdin closed and its own process group. The
runner limits its address space (RLIMIT_AS: `memory_mb`), its CPU seconds (RLIMIT_CPU) and file sizes, then runs
the program and the tests in one namespace. The parent enforces the wall-clock `timeout_s` and kills the whole
process group when it passes.

No network, in two layers: an audit hook (PEP 578) in the runner refuses every socket (and new processes and native
libraries, which could reach the network around it) and is what classifies an attempt as "network"; and where the
kernel lets us, the process also runs in a new, empty network namespace (`unshare --net`, as root, or with
`--user --map-root-user` as an ordinary user where user namespaces are enabled), so that even code that slipped
past the hook finds no interface but a downed loopback. `network_isolation()` says which applies on this machine.

These are limits against a model's mistakes (endless loops, memory blow-ups, stray downloads), not a security
boundary against a hostile author: run generated code only where you would run untrusted code, and only after the
user opted in (`--allow-code-execution`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CODE_OUTCOMES = ("passed", "failed", "error", "timeout", "memory", "network")
RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_NAMESPACE_PREFIXES = (["unshare", "--net", "--"], ["unshare", "--user", "--map-root-user", "--net", "--"])


@dataclass(frozen=True)
class CodeVerdict:
    passed: bool
    outcome: str  # one of CODE_OUTCOMES
    detail: str  # one line


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """The `unshare` prefix that gives a new network namespace here, or () where none works (probed once)."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in _NAMESPACE_PREFIXES:
        try:
            probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


def network_isolation() -> str:
    """How candidates are kept off the network here: "network namespace + audit hook" or "audit hook"."""
    return "network namespace + audit hook" if _namespace_prefix() else "audit hook"


def _tail(path: Path, limit: int = 4000) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        return handle.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_code_tests(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> CodeVerdict:
    """Run `program`, then `tests` (Python statements, usually asserts) in the same namespace, in a limited
    subprocess. "passed": every test ran; "failed": an assertion of the tests failed; "error": the program or the
    tests raised anything else, exited early, or tried to start a process; "timeout": past `timeout_s` wall-clock
    seconds (or the CPU limit); "memory": past `memory_mb` MiB of address space; "network": tried to open a socket.
    Only call this when the user opted in to running generated code."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="yulan_tune_code_") as work_dir:
        work = Path(work_dir)
        (work / "program.py").write_text(program, encoding="utf-8")
        (work / "tests.py").write_text(tests, encoding="utf-8")
        read_fd, write_fd = os.pipe()
        command = [*_namespace_prefix(), sys.executable, "-I", str(RUNNER), str(write_fd), str(memory_mb),
                   str(math.ceil(timeout_s) + 1)]
        environment = {"PATH": os.defpath, "HOME": work_dir, "TMPDIR": work_dir, "LC_ALL": "C.UTF-8"}
        timed_out = False
        with open(work / "stdout.txt", "wb") as stdout, open(work / "stderr.txt", "wb") as stderr:
            try:
                process = subprocess.Popen(command, cwd=work, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                           pass_fds=(write_fd,), env=environment, start_new_session=True)
            finally:
                os.close(write_fd)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError):  # gone already
                    os.killpg(process.pid, signal.SIGKILL)  # the candidate's stray children too
                process.wait()
        with os.fdopen(read_fd, "rb") as result:
            raw = result.read()
        stderr_text = _tail(work / "stderr.txt")
    if raw:
        try:
            reported = json.loads(raw)
            outcome, detail = reported["outcome"], reported["detail"]
        except (ValueError, KeyError, TypeError):
            outcome, detail = "error", "the sandbox returned an unreadable result"
        return CodeVerdict(outcome == "passed", outcome, detail)
    if timed_out:
        return CodeVerdict(False, "timeout", f"no result within {timeout_s:g} s (wall clock)")
    if process.returncode == -signal.SIGXCPU:
        return CodeVerdict(False, "timeout", f"CPU time limit of {math.ceil(timeout_s) + 1} s reached")
    if "MemoryError" in stderr_text:
        return CodeVerdict(False, "memory", f"MemoryError (limit {memory_mb} MiB)")
    if process.returncode < 0:
        return CodeVerdict(False, "error", f"killed by signal {-process.returncode}: {_last_line(stderr_text)}")
    return CodeVerdict(False, "error", f"exited with status {process.returncode} before the tests finished"
                       + (f": {_last_line(stderr_text)}" if _last_line(stderr_text) else ""))

