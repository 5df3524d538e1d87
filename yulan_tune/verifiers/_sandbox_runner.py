"""Runs one candidate program and its tests; started by `yulan_tune.verifiers.code` as
`python -I _sandbox_runner.py RESULT_FD MEMORY_MB CPU_S` in a fresh temporary directory holding program.py and
tests.py. Standard library only, and imports nothing of yulan_tune (it runs under `python -I`, outside the package).

Before the candidate runs it limits itself (address space, CPU seconds, file size, no core dumps) and installs an
audit hook (PEP 578) that refuses sockets, new processes and native libraries; a refused attempt is remembered even
if the candidate catches the exception. The outcome is written as one JSON object to RESULT_FD, then the process
ends at once with os._exit (no atexit handler of the candidate runs)."""

import json
import os
import resource
import signal
import sys
import traceback

FILE_SIZE_LIMIT = 16 * 2**20  # bytes any one file (stdout and stderr included) may grow to
PROCESS_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                  "pty.spawn")


def limit_resources(memory_mb, cpu_s):
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises OSError instead of killing


def install_guard(refused):
    def audit(event, args):
        if event.startswith("socket."):
            kind = "open a network connection"
        elif event in PROCESS_EVENTS:
            kind = "start a process"
        elif event == "ctypes.dlopen":
            kind = "load a native library"
        else:
            return
        refused.append((kind, event))
        raise PermissionError(f"{event} is not allowed in the code verifier's sandbox")

    sys.addaudithook(audit)


def last_line(error):
    lines = traceback.format_exception_only(type(error), error)
    return lines[-1].strip()[:300] if lines else type(error).__name__


def main():
    result_fd, memory_mb, cpu_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    with open("program.py", encoding="utf-8") as handle:
        program = handle.read()
    with open("tests.py", encoding="utf-8") as handle:
        tests = handle.read()
    limit_resources(memory_mb, cpu_s)
    refused = []
    install_guard(refused)
    namespace = {"__name__": "candidate"}  # a program's `if __name__ == "__main__":` block does not run
    stage = "program"
    try:
        exec(compile(program, "program.py", "exec"), namespace)
        stage = "tests"
        exec(compile(tests, "tests.py", "exec"), namespace)
        outcome, detail = "passed", "all tests passed"
    except AssertionError as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        outcome = "failed" if stage == "tests" else "error"
        detail = f"{where.filename}:{where.lineno}: {where.line or 'assertion failed'}"
        if str(error):
            detail += f" ({str(error)[:200]})"
    except MemoryError:
        outcome, detail = "memory", f"MemoryError in the {stage} (limit {memory_mb} MiB)"
    except SystemExit as error:
        outcome, detail = "error", f"the {stage} called exit({error.code!r}) before the tests finished"
    except BaseException as error:  # noqa: BLE001 - whatever the candidate raises is its verdict
        outcome, detail = "error", f"{stage}: {last_line(error)}"
    if refused:  # refused even if the candidate caught the PermissionError
        kind, event = refused[0]
        outcome = "network" if event.startswith("socket.") else "error"
        detail = f"tried to {kind} ({event}), which the sandbox refuses"
    os.write(result_fd, json.dumps({"outcome": outcome, "detail": detail}).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
