"""`yulan-tune dynamics` on a series of a tiny PretrainRecipe run: checkpoints kept at chosen steps, linear CKA's
invariances, equal statistics for a yulanmini checkpoint and its Llama export, the probe loss against a loss computed
here, a planted copy flagged, the CLI's outputs and one-line errors, and the HTML report in headless Chromium.

No number here depends on how well the tiny model trains: only identities, invariances and equalities."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from yulan_tune.cli import main as cli_main
from yulan_tune.console import DEBUG_ENV
from yulan_tune.data.bundled import heldout_documents, prepare_bundled_corpus
from yulan_tune.evaluation.dynamics import (
    COLUMNS,
    analyse_dynamics,
    build_probe,
    linear_cka,
    probe_documents,
    resolve_checkpoints,
    spectral_norm,
)
from yulan_tune.loading import load_tokenizer
from yulan_tune.modeling.convert import to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniForCausalLM
from yulan_tune.pretrain import PretrainConfig, PretrainRecipe
from yulan_tune.tiny import tiny_tokenizer
from yulan_tune.training.checkpoints import list_checkpoints

SEQ_LEN, BATCH = 64, 4
KEPT_STEPS = [2, 4, 8, 10]  # plus the phase ends 6 and 12: six checkpoints
CURRICULUM = f"""seq_len: {SEQ_LEN}
phases:
  - name: code
    tokens: {{stdlib: {4 * BATCH * SEQ_LEN}, math: {2 * BATCH * SEQ_LEN}}}
  - name: math
    tokens: {{stdlib: {2 * BATCH * SEQ_LEN}, math: {4 * BATCH * SEQ_LEN}}}
"""
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# settings shared by the analyses below: a small probe keeps each one to about a second
PROBE = {"probe_rows": 2, "probe_seq_len": 48}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny PretrainRecipe run (2 phases, 12 steps) that keeps checkpoints at KEPT_STEPS and its phase ends while
    rotation keeps only the last one."""
    root = tmp_path_factory.mktemp("dynamics")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    prepare_bundled_corpus(root / "data", tokenizer, seq_len=SEQ_LEN, stdlib_docs=30, heldout_docs=4,
                           math_train=300, math_test=60)
    (root / "curriculum.yaml").write_text(CURRICULUM)
    config = PretrainConfig(
        output_dir=str(root / "run"), curriculum=str(root / "curriculum.yaml"), data_root=str(root / "data"),
        tokenizer=str(tokenizer), seed=0,
        model_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
                      "intermediate_size": 128, "dim_model_base_lr": 64},
        per_device_train_batch_size=BATCH, warmup_steps=2, decay_steps=4, save_steps=10**9, keep_last_checkpoints=1,
        keep_checkpoint_steps=KEPT_STEPS, logging_steps=1, monitor_every_steps=0, report_to="none", use_cpu=True,
        disable_tqdm=True)
    PretrainRecipe(config).run()
    return root / "run"


@pytest.fixture(scope="module")
def series(run_dir, tmp_path_factory) -> tuple[pd.DataFrame, Path, float]:
    out = tmp_path_factory.mktemp("dynamics_out")
    started = time.time()
    table = analyse_dynamics([run_dir], out, show_progress=False)
    return table, out, time.time() - started


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step}"


def rows(table: pd.DataFrame, metric: str, name: str | None = None) -> pd.DataFrame:
    part = table[table["metric"] == metric]
    return part if name is None else part[part["checkpoint"] == name]


# ------------------------------------------------------------------------------------------------ keeping a series


def test_pretrain_keeps_the_chosen_steps_and_phase_ends(run_dir):
    complete, _ = list_checkpoints(run_dir)
    assert [int(p.name.split("-")[1]) for p in complete] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="keep_checkpoint_steps"):
        PretrainConfig(output_dir="x", keep_checkpoint_steps=[0, 3], use_cpu=True)


def test_anneal_config_keeps_steps_and_refuses_rotation():
    from yulan_tune.anneal import AnnealConfig

    config = AnnealConfig(output_dir="x", data={"a.jsonl": 1.0}, keep_checkpoint_steps=[5, 2, 5], use_cpu=True)
    assert config.keep_checkpoint_steps == [2, 5]
    with pytest.raises(ValueError, match="save_total_limit"):
        AnnealConfig(output_dir="x", data={"a.jsonl": 1.0}, keep_checkpoint_steps=[2], save_total_limit=1,
                     use_cpu=True)


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("n, d", [(40, 12), (12, 40)])  # both of linear_cka's forms (features, n x n Gram)
def test_linear_cka_identity_orthogonal_and_scale_invariance(n, d):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, d + 3, generator=generator, dtype=torch.float64) + 0.5 * torch.cat(
        [x, torch.zeros(n, 3, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(7.5 * x, x) == pytest.approx(1.0, abs=1e-12)
    reference = linear_cka(x, y)
    assert 0.0 < reference < 1.0
    assert linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(0.01 * x, y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(y, x) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x + 3.0, y) == pytest.approx(reference, abs=1e-12)  # centring removes offsets
    # the definition written out (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred
    xc, yc = x - x.mean(0), y - y.mean(0)
    written = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert reference == pytest.approx(float(written), abs=1e-12)


def test_randomized_spectral_norm_is_close_to_the_exact_one():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(700, 600, generator=generator) / 30 + torch.outer(
        torch.randn(700, generator=generator), torch.randn(600, generator=generator)) / 100
    exact = spectral_norm(matrix, exact_max_dim=10_000)
    estimate = spectral_norm(matrix, exact_max_dim=100)
    assert exact == pytest.approx(float(torch.linalg.svdvals(matrix.double())[0]), rel=1e-5)
    assert estimate == pytest.approx(exact, rel=1e-3)
    assert spectral_norm(matrix, exact_max_dim=100) == estimate  # seeded: the same estimate every time


# ------------------------------------------------------------------------------------------------ the series


def test_series_of_six_is_ordered_complete_and_written(series, run_dir):
    table, out, seconds = series
    print(f"\nsix tiny checkpoints analysed in {seconds:.2f} s")
    assert tuple(table.columns) == COLUMNS
    infos = table.attrs["checkpoints"]
    assert [info["step"] for info in infos] == [2, 4, 6, 8, 10, 12]
    assert all(info["form"] == "yulanmini" and info["duplicate_of"] is None for info in infos)
    assert list(dict.fromkeys(table["checkpoint"])) == [f"checkpoint-{s}" for s in (2, 4, 6, 8, 10, 12)]
    assert (rows(table, "duplicate")["value"] == 0).all()
    # every checkpoint: every metric family; CKA / weight change against a previous one from the second on
    for name in table["checkpoint"].unique():
        metrics = set(table[table["checkpoint"] == name]["metric"])
        assert {"weight_norm", "weight_norm_per_numel", "weight_norm_per_sqrt_numel", "spectral_norm",
                "stable_rank", "wesar_scalar", "hidden_states_rms", "hidden_states_var", "hidden_states_mean",
                "attention_entropy", "probe_loss/code", "probe_loss/math", "cka_last"} <= metrics
    assert set(rows(table, "cka_previous")["checkpoint"]) == {f"checkpoint-{s}" for s in (4, 6, 8, 10, 12)}
    assert len(rows(table, "relative_weight_change", "checkpoint-2")) == 0
    assert (rows(table, "cka_last", "checkpoint-12")["value"] - 1).abs().max() < 1e-9
    assert set(rows(table, "hidden_states_rms")["layer"]) == {"embed", "layer_00", "layer_01"}
    # WeSaR scalars: every *_alpha parameter of the checkpoint, with its value
    model = YuLanMiniForCausalLM.from_pretrained(checkpoint(run_dir, 12), dtype=torch.float32)
    alphas = {name: float(p.detach().reshape(-1)[0]) for name, p in model.named_parameters() if name.endswith("_alpha")}
    found = rows(table, "wesar_scalar", "checkpoint-12").set_index("layer")["value"].to_dict()
    assert found == pytest.approx(alphas, abs=0) and alphas
    # the reference script's three measures are one norm
    norms = rows(table, "weight_norm", "checkpoint-12").set_index("layer")["value"]
    per_sqrt = rows(table, "weight_norm_per_sqrt_numel", "checkpoint-12").set_index("layer")["value"]
    head = model.lm_head.weight
    assert per_sqrt["lm_head.weight"] == pytest.approx(norms["lm_head.weight"] / math.sqrt(head.numel()), rel=1e-12)
    # outputs
    assert pd.read_csv(out / "dynamics.csv").shape == table.shape
    document = json.loads((out / "dynamics.json").read_text())
    assert document["columns"] == list(COLUMNS) and len(document["rows"]) == len(table)
    assert [c["step"] for c in document["checkpoints"]] == [2, 4, 6, 8, 10, 12]
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"probe_loss.png", "hidden_states.png", "cka.png",
                                                                "weight_change.png", "spectra.png", "wesar.png"}
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 6


def test_probe_loss_equals_a_loss_computed_here(series, run_dir):
    """The native yulanmini forward (not the folded Llama the analysis runs), cross-entropy written out here."""
    table, _, _ = series
    tokenizer = load_tokenizer(checkpoint(run_dir, 2))
    probe = build_probe(tokenizer, heldout_documents(), rows=4, seq_len=256)
    for step in (2, 8, 12):
        model = YuLanMiniForCausalLM.from_pretrained(checkpoint(run_dir, step), dtype=torch.float32).eval()
        found = rows(table, "probe_loss/code", f"checkpoint-{step}")["value"].item(), rows(
            table, "probe_loss/math", f"checkpoint-{step}")["value"].item()
        expected = []
        for domain in ("code", "math"):
            ids = probe.domains[domain]
            with torch.no_grad():
                logits = torch.cat([model(input_ids=ids[i:i + 1]).logits for i in range(ids.shape[0])]).double()
            log_probs = logits[:, :-1].log_softmax(-1)
            expected.append(float(-log_probs.gather(-1, ids[:, 1:, None]).mean()))
        assert found == pytest.approx(tuple(expected), abs=1e-5)
        with torch.no_grad():  # the same through torch's cross-entropy on the whole batch
            batch_logits = model(input_ids=probe.domains["code"]).logits[:, :-1].double()
        cross_entropy = F.cross_entropy(batch_logits.reshape(-1, batch_logits.shape[-1]),
                                        probe.domains["code"][:, 1:].reshape(-1))
        assert expected[0] == pytest.approx(float(cross_entropy), abs=1e-5)


def test_yulanmini_and_its_llama_export_give_equal_statistics(run_dir, tmp_path):
    steps = (4, 12)
    exports = []
    for step in steps:
        exports.append(tmp_path / "llama" / f"checkpoint-{step}")
        to_llama(checkpoint(run_dir, step), exports[-1], dtype=torch.float32)
    native = analyse_dynamics([checkpoint(run_dir, s) for s in steps], show_progress=False, **PROBE)
    llama = analyse_dynamics(exports, show_progress=False, **PROBE)
    assert [c["form"] for c in llama.attrs["checkpoints"]] == ["llama", "llama"]
    assert [c["step"] for c in llama.attrs["checkpoints"]] == list(steps)  # from the directory names
    native = native[native["metric"] != "wesar_scalar"]  # the Llama form has no WeSaR scalars
    key = ["checkpoint", "metric", "layer"]
    merged = native.merge(llama, on=key, suffixes=("_yulanmini", "_llama"), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][key]
    difference = (merged["value_yulanmini"] - merged["value_llama"]).abs()
    print(f"\nyulanmini vs to_llama export: {len(merged)} statistics, max |difference| {difference.max():.3g}")
    assert difference.max() <= 1e-5
    assert set(merged["metric"]) >= {"spectral_norm", "cka_previous", "relative_weight_change", "attention_entropy"}


def test_a_planted_copy_is_flagged(run_dir, tmp_path):
    """checkpoint-4's weights and tokenizer under the name checkpoint-7: it claims step 7 and is flagged."""
    planted = tmp_path / "planted" / "checkpoint-7"
    planted.mkdir(parents=True)
    for file in checkpoint(run_dir, 4).iterdir():
        if file.name.endswith((".json", ".safetensors", ".jinja")) and file.name not in (
                "trainer_state.json", "checkpoint_complete.json"):
            shutil.copy2(file, planted / file.name)
    table = analyse_dynamics([checkpoint(run_dir, 8), planted, checkpoint(run_dir, 4), checkpoint(run_dir, 2)],
                             show_progress=False, **PROBE)
    infos = table.attrs["checkpoints"]
    assert [(c["name"], c["step"]) for c in infos] == [("checkpoint-2", 2), ("checkpoint-4", 4),
                                                       ("checkpoint-7", 7), ("checkpoint-8", 8)]
    assert [c["duplicate_of"] for c in infos] == [None, None, "checkpoint-4", None]
    assert rows(table, "duplicate").set_index("checkpoint")["value"].to_dict() == {
        "checkpoint-2": 0.0, "checkpoint-4": 0.0, "checkpoint-7": 1.0, "checkpoint-8": 0.0}
    assert rows(table, "relative_weight_change", "checkpoint-7")["value"].abs().max() == 0
    assert infos[1]["content_hash"] == infos[2]["content_hash"] != infos[0]["content_hash"]


def test_checkpoint_resolution_and_probe_files(run_dir, tmp_path):
    assert [c.step for c in resolve_checkpoints([checkpoint(run_dir, 10), run_dir / "final"])] == [10, 12]
    with pytest.raises(ValueError, match="more than once"):
        resolve_checkpoints([run_dir, checkpoint(run_dir, 2)])
    (tmp_path / "notes.txt").write_text("first paragraph of notes\n\nsecond paragraph\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a row of text"}) + "\n")
    documents = probe_documents([str(tmp_path / "notes.txt"), f"mine={tmp_path / 'rows.jsonl'}"])
    assert documents == {"notes": ["first paragraph of notes", "second paragraph\n"], "mine": ["a row of text"]}


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def test_cli_writes_outputs_and_errors_are_one_line(run_dir, tmp_path, capsys, no_debug):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    code = cli_main(["dynamics", str(checkpoint(run_dir, 2)), str(checkpoint(run_dir, 6)), "--out", str(out),
                     "--probe", f"snippets={probe}", "--probe-rows", "2", "--probe-seq-len", "32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dynamics: 2 checkpoints analysed" in printed and "no duplicate checkpoints" in printed
    table = pd.read_csv(out / "dynamics.csv")
    assert set(table["metric"]) >= {"probe_loss/snippets", "cka_previous"}
    assert (out / "report.html").is_file() and (out / "yulan_tune_metrics.json").is_file()

    for argv, expected in (
            ([str(tmp_path / "missing")], "missing: no such directory"),
            ([str(checkpoint(run_dir, 2)), "--probe", str(tmp_path / "none.jsonl")], "none.jsonl"),
            ([str(tmp_path)], "neither a model directory")):
        assert cli_main(["dynamics", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("yulan-tune dynamics: error: ") and expected in err[0], err


def test_tasks_through_the_harness(run_dir, tmp_path):
    table = analyse_dynamics([checkpoint(run_dir, 12)], show_progress=False, tasks=["yulan_math"], task_limit=2,
                             **PROBE)
    scores = table[table["metric"].str.startswith("task/yulan_math")]
    assert len(scores) >= 1 and scores["value"].between(0, 1).all()


# ------------------------------------------------------------------------------------------------ the report


def test_report_opens_in_headless_chromium(series):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (make browser)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    _, out, _ = series
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((out / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(ARTIFACTS / "dynamics_report.png"), full_page=True)
            images = page.evaluate("() => Array.from(document.images).map(i => [i.naturalWidth, i.alt])")
            summary_rows = page.locator("#summary tbody tr").count()
            table_rows = page.locator("#table tbody tr").count()
        finally:
            browser.close()
    assert len(images) >= 6 and all(width > 0 for width, _ in images), images
    assert summary_rows == 6 and table_rows == len(series[0])
    assert (ARTIFACTS / "dynamics_report.png").stat().st_size > 0
