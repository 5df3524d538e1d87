"""Curriculum files (the reference's data_mix JSON, YAML) and the mixture of packed datasets a phase trains on."""

from __future__ import annotations

import json
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from yulan_tune.data.curriculum import (
    Curriculum,
    CurriculumError,
    Phase,
    load_curriculum,
    parse_token_count,
    plan_phases,
    read_data_mix,
    token_budget_to_steps,
)
from yulan_tune.data.mixture import MixtureDataset, open_phase
from yulan_tune.data.packed import PackedDataset
from yulan_tune.data.packing import prepare_packed_dataset
from yulan_tune.paths import PRETRAIN_DIR, REPO_ROOT

SHARED_YULAN = REPO_ROOT.parent / "shared" / "yulan"
DATA_MIX = SHARED_YULAN / "data_mix" / "26_20241211_015209.json"
needs_shared = pytest.mark.skipif(not DATA_MIX.exists(), reason="the reference data_mix sample is not checked out")


@needs_shared
def test_reference_data_mix_parses_into_its_stated_budgets():
    raw = json.loads(DATA_MIX.read_text())
    phase = read_data_mix(DATA_MIX)
    selected = raw["Number of Selected Tokens(B)"]
    assert phase.name == "26_20241211_015209" and len(phase.tokens) == len(selected) == 121
    # every subset's budget is exactly what the file states it selected (billions -> tokens)
    assert phase.tokens == {subset: round(value * 1e9) for subset, value in selected.items()}
    assert phase.tokens["fineweb-edu"] == 14_582_212_630 and phase.tokens["ape210k"] == 10_307_460
    # ... which is the realized selection: it equals each subset's file groups and sums to the stated total,
    groups = raw["Token ID Files Information"]
    for subset, tokens in phase.tokens.items():
        assert abs(tokens - sum(g["token num(B)"] for g in groups[subset]) * 1e9) <= 1
    assert abs(phase.total_tokens - raw["Total Tokens(B)"] * 1e9) <= len(selected)
    # ... while the manual targets are not what was trained on (they sum to 40.03B, not 40.29B)
    manual = sum(value[0] for value in raw["Manual Selected Tokens(B)"].values())
    assert abs(manual * 1e9 - phase.total_tokens) > 2e8
    assert len(phase.metadata["is_sft"]) == sum(v[1] == "1" for v in raw["Manual Selected Tokens(B)"].values())
    assert len(phase.metadata["file_groups"]["fineweb-edu"]) == 5


@needs_shared
def test_yulan_mini_curriculum_files_hold_the_27_phases(tmp_path):
    source = json.loads((SHARED_YULAN / "curriculum.json").read_text())["phases"]
    curriculum = load_curriculum(PRETRAIN_DIR / "curriculum" / "yulan_mini.yaml")
    assert [p.name for p in curriculum.phases] == [f"{i:02d}" for i in range(1, 28)]
    expected = [p for p in source if not (p["phase"] == 26 and p["context"] == "4K")]
    for phase, reference in zip(curriculum.phases, expected):
        assert phase.metadata["mix_id"] == reference["mix_id"]
        assert phase.tokens == {s: round(v["tokens_b"] * 1e9) for s, v in reference["subsets"].items()}
        assert phase.seq_len == (28672 if reference["context"] == "28K" else 4096)
    # the 28K phase 26 is the data_mix sample: the two reference sources agree (curriculum.json keeps 6 decimals)
    sample = read_data_mix(DATA_MIX).tokens
    assert curriculum.phases[25].tokens.keys() == sample.keys()
    assert all(abs(curriculum.phases[25].tokens[s] - sample[s]) <= 500 for s in sample)
    assert sum(p.total_tokens for p in curriculum.phases) == pytest.approx(1.0849e12, rel=1e-4)
    four_k = load_curriculum(PRETRAIN_DIR / "curriculum" / "yulan_mini_4k.yaml")
    assert [p.name for p in four_k.phases][-2:] == ["25", "26-4k"] and four_k.phases[-1].seq_len == 4096
    # the committed files are what the generator writes
    generator = runpy.run_path(str(PRETRAIN_DIR / "make_yulan_curriculum.py"))
    assert generator["main"](["--source", str(SHARED_YULAN / "curriculum.json"), "--out", str(tmp_path)]) == 0
    for name in ("yulan_mini.yaml", "yulan_mini_4k.yaml"):
        assert (tmp_path / name).read_text() == (PRETRAIN_DIR / "curriculum" / name).read_text()


def test_yaml_long_and_short_forms(tmp_path):
    long_form = tmp_path / "long.yaml"
    long_form.write_text(
        "seq_len: 128\ndata_root: data\ndatasets: {special: /abs/special}\nphases:\n"
        "  - name: a\n    tokens: {web: 1.5M, code: 300000}\n"
        "  - name: b\n    seq_len: 512\n    total_tokens: 1B\n    weights: {web: 3, code: 1}\n    note: kept\n")
    curriculum = load_curriculum(long_form)
    assert [p.tokens for p in curriculum.phases] == [{"web": 1_500_000, "code": 300_000},
                                                      {"web": 750_000_000, "code": 250_000_000}]
    assert curriculum.phase_seq_len(curriculum.phases[0]) == 128 and curriculum.phases[1].seq_len == 512
    assert curriculum.phases[1].metadata == {"note": "kept"}
    assert curriculum.dataset_path("web") == tmp_path / "data" / "web"
    assert curriculum.dataset_path("special") == Path("/abs/special")
    assert curriculum.dataset_path("web", data_root="/elsewhere") == Path("/elsewhere/web")

    short_form = tmp_path / "short.yaml"
    short_form.write_text("phase_tokens: 10K\nphases:\n  one: {web: 0.25, code: 0.75}\n  two: {web: 2K, code: 500}\n")
    phases = load_curriculum(short_form).phases
    assert [(p.name, p.tokens) for p in phases] == [("one", {"web": 2500, "code": 7500}),
                                                     ("two", {"web": 2000, "code": 500})]
    assert [parse_token_count(v) for v in ("40B", "1.5m", "300k", "4096", 7, "2e3")] == \
        [40 * 10**9, 1_500_000, 300_000, 4096, 7, 2000]

    for text, message in [
        ("phases:\n  p: {web: 0.5, code: 100}\n", r"phase 'p': mixes token counts and weights \(floats: \['web'\]\)"),
        ("phases:\n  p: {web: 0.5}\n", "phase 'p': weights .* need a top-level `phase_tokens`"),
        ("phases:\n  - name: p\n    tokens: {web: lots}\n", r"phase 'p': dataset 'web': expected a token count"),
        ("phases:\n  - name: p\n    weights: {web: 1}\n", "phase 'p': `weights` need a `total_tokens`"),
        ("phases:\n  - {name: p, tokens: {a: 1}}\n  - {name: p, tokens: {a: 1}}\n", r"duplicate phase names \['p'\]"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CurriculumError, match=message) as error:
            load_curriculum(bad)
        assert str(bad) in str(error.value)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_dir) -> dict[str, PackedDataset]:
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for name, count in (("web", 30), ("code", 10)):
        text = root / f"{name}.jsonl"
        text.write_text("".join(json.dumps({"text": f"{name} document {i} " + "abc def " * 9}) + "\n"
                                for i in range(count)))
        prepare_packed_dataset([text], tiny_dir, root / name, seq_len=16, progress=False)
        out[name] = PackedDataset(root / name)
    return out


def test_mixture_takes_each_budget_and_walks_each_stream(packed):
    web, code = packed["web"], packed["code"]
    assert len(web) > 40 and len(code) > 8
    rows = {"web": 12, "code": 2 * len(code) + 5}  # code is repeated: 2.x passes
    mixture = MixtureDataset(packed, rows, seed=3, shuffle_seed=[3, 0])
    assert len(mixture) == sum(rows.values())
    assert Counter(mixture.source_of(i) for i in range(len(mixture))) == rows
    code_rows = [int(mixture.row_index[i]) for i in range(len(mixture)) if mixture.source_of(i) == "code"]
    assert sorted(Counter(code_rows).values()) == sorted([3] * 5 + [2] * (len(code) - 5))  # full passes first
    assert mixture.passes["code"] == pytest.approx(rows["code"] / len(code))
    for i in (0, 5, len(mixture) - 1):  # items are the packed rows themselves
        source = packed[mixture.source_of(i)]
        np.testing.assert_array_equal(mixture[i]["input_ids"].numpy(), source.row(int(mixture.row_index[i])))
    again = MixtureDataset(packed, rows, seed=3, shuffle_seed=[3, 0])
    np.testing.assert_array_equal(again.row_index, mixture.row_index)
    np.testing.assert_array_equal(again.source_index, mixture.source_index)
    other_order = MixtureDataset(packed, rows, seed=3, shuffle_seed=[3, 1])
    assert not np.array_equal(other_order.row_index, mixture.row_index)


def test_phase_plans_continue_each_dataset_where_the_last_phase_stopped(packed):
    seq = 16
    curriculum = Curriculum(
        phases=[Phase("one", {"web": 20 * seq, "code": 4 * seq}), Phase("two", {"web": 15 * seq}),
                Phase("three", {"web": 30 * seq, "code": 6 * seq + 3})],
        seq_len=seq, dataset_dirs={name: str(ds.path) for name, ds in packed.items()})
    plans = plan_phases(curriculum, rows_per_step=4)
    assert [(p.rows, p.steps, p.dropped_rows) for p in plans] == [
        ({"web": 20, "code": 4}, 6, 0), ({"web": 15}, 3, 3), ({"web": 30, "code": 6}, 9, 0)]
    assert [p.offsets for p in plans] == [{"web": 0, "code": 0}, {"web": 20}, {"web": 35, "code": 4}]
    cache: dict[str, PackedDataset] = {}
    one, two = open_phase(plans[0], seed=0, cache=cache), open_phase(plans[1], seed=0, cache=cache)
    assert len(two) == 12  # truncated to whole steps: 3 rows reported as dropped
    web_one = {int(r) for r, s in zip(one.row_index, one.source_index) if one.names[s] == "web"}
    web_two = {int(r) for r, s in zip(two.row_index, two.source_index) if two.names[s] == "web"}
    assert len(web_one) == 20 and not web_one & web_two  # phase two gets new rows of the same dataset
    assert token_budget_to_steps(plans, 0) == 0
    assert token_budget_to_steps(plans, 6 * 4 * seq + 1) == 7  # rounds up into the next phase
    assert token_budget_to_steps(plans, 10 * 4 * seq, from_end=True) == 10
    with pytest.raises(CurriculumError, match="exceed"):
        token_budget_to_steps(plans, 10**9)
    missing = Curriculum(phases=[Phase("p", {"nowhere": 64})], seq_len=seq, data_root="/nonexistent")
    with pytest.raises(CurriculumError, match=r"'nowhere': no prepared dataset at /nonexistent/nowhere .*prepare-data"):
        open_phase(plan_phases(missing, rows_per_step=1)[0], seed=0)


def _write_data_mix(path: Path, manual: dict, directory: str = "/data/hf_dataset/YuLan-Mini/20240910_101112") -> Path:
    """A data_mix file in the layout the reference's fetch_data.py writes (its train_circle_info)."""
    path.write_text(json.dumps({
        "Total Tokens(B)": 0.6,
        "Total Huggingface Datasets Directory": directory,
        "Number of Selected Tokens(B)": {"web-en": 0.4, "math-en": 0.2, "code-en": 0.0},
        "Manual Selected Tokens(B)": manual,
        "Token ID Files Information": {"web-en": [{"group index": 0, "huggingface datasets directory": "a/web-en_0",
                                                  "token num(B)": 0.4, "token id file paths": ["x.jsonl"]}],
                                       "math-en": []},
    }))
    return path


def test_data_mix_layouts_of_every_phase(tmp_path):
    # earlier phases: manual targets are plain numbers, the datasets directory a full path
    early = read_data_mix(_write_data_mix(tmp_path / "01.json", {"web-en": 0.39, "math-en": 0.21, "code-en": 0.0}))
    assert early.name == "20240910_101112"
    assert early.tokens == {"web-en": 400_000_000, "math-en": 200_000_000}  # a subset with 0 selected is not a budget
    assert early.metadata["manual_tokens_b"] == {"web-en": 0.39, "math-en": 0.21, "code-en": 0.0}
    assert early.metadata["is_sft"] == [] and early.metadata["empty_subsets"] == ["code-en"]
    # later phases: [target, is_sft flag]
    late = read_data_mix(_write_data_mix(tmp_path / "20.json", {"web-en": [0.39, ""], "math-en": [0.21, "1"]},
                                         directory="20_20241101_000000"))
    assert late.name == "20_20241101_000000" and late.metadata["is_sft"] == ["math-en"]
    assert late.metadata["file_groups"] == {"web-en": ["a/web-en_0"], "math-en": []}


@pytest.mark.parametrize(("manual", "message"), [
    ({"web-en": {"target": 0.4}}, r"field 'Manual Selected Tokens\(B\)'.'web-en': expected a number or \[number"),
    ({"web-en": [0.4, "yes"]}, r"field 'Manual Selected Tokens\(B\)'.'web-en': expected the is_sft flag"),
    ([0.4], r"field 'Manual Selected Tokens\(B\)': expected an object keyed by subset"),
])
def test_unknown_data_mix_layout_names_the_field(tmp_path, manual, message):
    with pytest.raises(CurriculumError, match=message):
        read_data_mix(_write_data_mix(tmp_path / "bad.json", manual))
