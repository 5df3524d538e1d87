"""`synth`: templates, verdicts, resumable output, the sampling backends, and the command against a local
OpenAI-compatible server killed mid-run and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from yulan_tune.cli import main as cli_main
from yulan_tune.data.records import DataFormatError
from yulan_tune.generation import OpenAIBackend, SamplingSettings, TransformersBackend, sample_seed
from yulan_tune.generation.synthesis import (
    ACCEPTED_FILE,
    REJECTED_FILE,
    SAMPLES_FILE,
    Seed,
    SynthesisConfig,
    Synthesizer,
    extract_program,
    judge,
)
from yulan_tune.generation.templates import load_template, parse_template, shipped_templates

REPO = Path(__file__).resolve().parent.parent
STUB_SERVER = Path(__file__).resolve().parent / "openai_stub_server.py"

# ------------------------------------------------------------------------------------------------ templates


def test_every_shipped_template_loads_and_renders():
    assert {"math_solution", "math_problem", "code_solution", "rewrite", "lean_tactic"} <= set(shipped_templates())
    for name in shipped_templates():
        text = (REPO / "yulan_tune" / "generation" / "templates" / f"{name}.txt").read_text()
        template = parse_template(text, name)
        turns = template.render({field: f"<{field}>" for field in template.fields}, "row 1")
        assert turns[-1]["role"] == "user" and all(f"<{f}>" in str(turns) for f in template.fields)
        assert "{{" not in str(turns) and "#" not in turns[-1]["content"][:1]
    assert "\\boxed{ANSWER}" in load_template(None, "math").render({"question": "q"}, "x")[-1]["content"]


def test_template_errors_are_one_line():
    template = load_template("lean_tactic", "rewrite")
    with pytest.raises(DataFormatError, match=r"seeds.jsonl:3: field 'tactic': missing .*state_after"):
        template.render({"state_before": "a", "state_after": "b"}, "seeds.jsonl:3")
    with pytest.raises(ValueError, match="for --task rewrite, not --task math"):
        load_template("rewrite", "math")
    with pytest.raises(ValueError, match="'output:' must be one of"):
        parse_template("task: math\n[user]\nhi\n", "mine")
    with pytest.raises(FileNotFoundError, match="shipped template"):
        load_template("nope", "math")


# ------------------------------------------------------------------------------------------------ verdicts


def _seed(**row) -> Seed:
    return Seed("s", [{"role": "user", "content": "q"}], row, "x:1")


def test_math_verdicts_with_reference_and_by_vote():
    config = SynthesisConfig()
    template = load_template(None, "math")
    verdicts = judge(_seed(answer=12), ["so \\boxed{12}", "The answer is 11.", "hmm"], template, config)
    assert [(v["accepted"], v["reason"]) for v in verdicts] == [(True, "correct"), (False, "wrong answer"),
                                                                 (False, "no answer")]
    votes = judge(_seed(), ["\\boxed{6}", "6.0", "The answer is 7.", "nothing"], template, config)
    assert [(v["accepted"], v["reason"]) for v in votes] == [(True, "majority"), (True, "majority"),
                                                              (False, "minority"), (False, "no answer")]
    split = judge(_seed(), ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], template, config)
    assert {v["reason"] for v in split} == {"no majority"} and not any(v["accepted"] for v in split)
    assert judge(_seed(), ["\\boxed{1}"], template, config)[0]["reason"] == "single sample"


def test_problem_code_and_rewrite_verdicts():
    config = SynthesisConfig(task="code", allow_code_execution=True, code_timeout_s=3)
    problem = judge(_seed(text="t"), ["[Problem]\nHow many?\n[Solution]\n2 + 2 = 4, \\boxed{4}\n<END>", "no layout"],
                    load_template("math_problem", "math"), config)
    assert (problem[0]["accepted"], problem[0]["problem"], problem[0]["answer"]) == (True, "How many?", "4")
    assert problem[1]["reason"] == "malformed"
    completion = "Here:\n```python\ndef f(x):\n    return 2 * x\n```\nand a test ```\nf(1)\n```"
    assert extract_program(completion) == "def f(x):\n    return 2 * x\n"
    code = judge(_seed(tests="assert f(3) == 6"), [completion, "```python\ndef f(x):\n    return x\n```"],
                 load_template(None, "code"), config)
    assert [(v["accepted"], v["reason"]) for v in code] == [(True, "passed"), (False, "failed")]
    text = judge(_seed(text="same"), ["A clearer text.", " same ", ""], load_template(None, "rewrite"), config)
    assert [v["reason"] for v in text] == ["rewritten", "copies the seed", "empty"]


def test_code_task_needs_the_opt_in():
    with pytest.raises(ValueError, match="--allow-code-execution"):
        Synthesizer(SynthesisConfig(task="code"), backend=None)


# ------------------------------------------------------------------------------------------------ resumable output


class CountingBackend:
    """Deterministic completions from the prompt and the sample seed; counts the conversations it was asked for."""

    def __init__(self) -> None:
        self.asked = 0

    def generate(self, conversations, settings):
        self.asked += len(conversations)
        return [[f"\\boxed{{{sample_seed(settings.seed, c, j) % 3}}}" for j in range(settings.n)]
                for c in conversations]


SEEDS = [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": i % 3} for i in range(7)]


def test_resume_drops_torn_and_incomplete_seeds_and_equals_an_uninterrupted_run(tmp_path):
    config = SynthesisConfig(n=3, chunk_size=2)
    reference = Synthesizer(config, CountingBackend()).run(SEEDS, tmp_path / "ref", show_progress=False)
    assert (reference.samples, reference.accepted + reference.rejected) == (21, 21)
    full = (tmp_path / "ref" / SAMPLES_FILE).read_bytes()
    lines = full.splitlines(keepends=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "synth_run.json").write_bytes((tmp_path / "ref" / "synth_run.json").read_bytes())
    # killed after 3 complete seeds and 2 samples of the 4th, in the middle of writing the 6th line
    (run / SAMPLES_FILE).write_bytes(b"".join(lines[:11]) + lines[11][:25])
    backend = CountingBackend()
    resumed = Synthesizer(config, backend).run(SEEDS, run, show_progress=False)
    assert (resumed.done_before, resumed.generated, backend.asked) == (3, 4, 4)
    assert (run / SAMPLES_FILE).read_bytes() == full
    for name in (ACCEPTED_FILE, REJECTED_FILE):
        assert (run / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    rejected = [json.loads(line) for line in (run / REJECTED_FILE).read_text().splitlines()]
    assert rejected and all(row["reason"] == "wrong answer" and row["detail"] for row in rejected)
    again = CountingBackend()
    assert Synthesizer(config, again).run(SEEDS, run, show_progress=False).generated == 0 and again.asked == 0


def test_resume_with_other_settings_is_refused(tmp_path):
    Synthesizer(SynthesisConfig(n=2), CountingBackend()).run(SEEDS[:2], tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="settings.temperature differ"):
        Synthesizer(SynthesisConfig(n=2, temperature=0.9), CountingBackend()).run(SEEDS[:2], tmp_path,
                                                                                  show_progress=False)


def test_bad_seed_rows(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "question": "1 + 1?"}\n{"id": "b"}\n{"id": "a", "question": "2 + 2?"}\n')
    with pytest.raises(DataFormatError, match=r"seeds.jsonl:2: field 'question': missing"):
        Synthesizer(SynthesisConfig(n=2), CountingBackend()).run(seeds, tmp_path / "out", show_progress=False)
    result = Synthesizer(SynthesisConfig(n=2, on_bad_rows="skip"), CountingBackend()).run(
        seeds, tmp_path / "out2", show_progress=False)
    assert result.seeds == 1 and result.skipped.counts == {"invalid": 1, "duplicate id": 1}


# ------------------------------------------------------------------------------------------------ backends


def test_transformers_backend_samples_do_not_depend_on_batching(tiny_dir):
    from yulan_tune.data.math_problems import generate_problems, math_messages

    conversations = [math_messages(p) for p in generate_problems(3)]
    settings = SamplingSettings(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    backend = TransformersBackend(tiny_dir, batch_size=6)
    together = backend.generate(conversations, settings)
    backend.batch_size = 1
    apart = backend.generate(conversations[::-1], settings)[::-1]
    assert together == apart and len(together) == 3 and all(len(samples) == 2 for samples in together)
    assert together[0][0] != together[0][1]  # different seeds per sample (8 tokens of a 4096 vocabulary)
    greedy = backend.generate(conversations[:1], SamplingSettings(n=2, max_new_tokens=8))
    assert greedy[0][0] == greedy[0][1]


@pytest.fixture
def stub_server():
    process = subprocess.Popen([sys.executable, str(STUB_SERVER), "--delay", "0.15", "--fail-every", "10",
                                "--max-requests", "400"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def test_openai_backend_retries_and_fails_with_one_line(stub_server):
    backend = OpenAIBackend(stub_server + "/v1", "stub", concurrency=3, timeout_s=10, retries=2, backoff_s=0.05)
    settings = SamplingSettings(n=2, temperature=0.7, seed=0)
    conversations = [[{"role": "user", "content": f"{i} and {i + 1}"}] for i in range(6)]
    first = backend.generate(conversations, settings)
    assert backend.requests_sent >= 12 and len(first) == 6
    assert backend.generate(conversations, settings) == first  # seeded requests: the same answers again
    from yulan_tune.generation import GenerationError

    with pytest.raises(GenerationError, match="HTTP 404"):
        OpenAIBackend(stub_server + "/v2", "stub", retries=0).generate(conversations[:1], settings)
    with pytest.raises(GenerationError, match=r"gave up after 2 attempts"):
        OpenAIBackend("http://127.0.0.1:9/v1", "stub", retries=1, backoff_s=0.01).generate(conversations[:1], settings)


def _synth_argv(base_url: str, seeds: Path, out: Path) -> list[str]:
    return ["synth", "--task", "math", "--backend", "openai", "--model", "stub", "--base-url", base_url + "/v1",
            "--in", str(seeds), "--out", str(out), "--n", "3", "--temperature", "0.8", "--concurrency", "2",
            "--chunk-size", "2", "--retries", "5", "--timeout", "10"]


def test_synth_openai_killed_mid_run_resumes_to_the_uninterrupted_output(stub_server, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} plus {i + 2}?", "answer": 2 * i + 2})
                             + "\n" for i in range(12)))
    assert cli_main(_synth_argv(stub_server, seeds, tmp_path / "reference")) == 0
    out = tmp_path / "run"
    command = [sys.executable, "-m", "yulan_tune.cli", *_synth_argv(stub_server, seeds, out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    samples = out / SAMPLES_FILE
    deadline = time.time() + 120
    while time.time() < deadline and (not samples.is_file() or samples.read_text().count("\n") < 6):
        time.sleep(0.05)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert still_running, "the run finished before it could be killed"
    written = samples.read_text().count("\n")
    assert 6 <= written < 36
    with open(samples, "a") as handle:  # as if the kill had come in the middle of a write
        handle.write('{"id": "q9#0", "seed_id": "q9", "sam')
    assert cli_main(_synth_argv(stub_server, seeds, out)) == 0
    assert samples.read_bytes() == (tmp_path / "reference" / SAMPLES_FILE).read_bytes()
    assert (out / ACCEPTED_FILE).read_bytes() == (tmp_path / "reference" / ACCEPTED_FILE).read_bytes()
    metrics = json.loads((out / "yulan_tune_metrics.json").read_text())
    assert 2 <= metrics["done_before"] < 12 and metrics["samples"] == 36
    assert metrics["reasons"].keys() <= {"correct", "wrong answer"} and metrics["rejected"] > 0
    with urllib.request.urlopen(stub_server + "/stats") as response:
        assert json.loads(response.read())["requests"] <= 400


def test_synth_command_errors_are_one_line(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "add", "tests": "assert True"}\n')
    argv = ["synth", "--task", "code", "--backend", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
            "--in", str(seeds), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert cli_main(argv[:-4] + ["--in", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
