"""`yulan-tune clean` (datatrove): exact dedup removes exactly the planted copies, MinHash detects planted pairs at the
rate LSH theory gives, decontamination catches every planted held-out 13-gram and agrees with a brute-force overlap,
scores land in YuLan's score_<k> layout, and the kept output feeds `prepare-data`, byte-identical on a rerun."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.clean_throughput import SIMILARITIES, detection_rates, random_word
from yulan_tune.cli import main as cli_main
from yulan_tune.data.cleaning import (
    CleanConfig,
    CleanRecipe,
    decontamination_config,
    heldout_math_texts,
    parse_config,
)
from yulan_tune.paths import RECIPES_DIR

CONFIGS = RECIPES_DIR / "configs"
ONLY_DEDUP = dict(unicode=None, gopher_quality=None, gopher_repetition=None, c4_quality=None, fineweb_quality=None)


def prose(rng: random.Random, words: int = 120) -> str:
    """Letters-only words (no digits: datatrove's normalization maps every digit to 0), in sentences."""
    out = []
    while len(out) < words:
        out += [random_word(rng, rng.randint(3, 8)) for _ in range(rng.randint(6, 14))] + ["the", "of", "and"]
    return " ".join(out[:words]) + "."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.rglob("*.jsonl")) for line in path.read_text().splitlines()]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_exact_dedup_removes_exactly_the_planted_duplicates(tmp_path):
    rng = random.Random(1)
    unique = [prose(rng) for _ in range(300)]
    # one-character variants are distinct documents: exact dedup must keep them
    unique += [text[:-1] + "!" for text in unique[:20]]
    planted = [rng.choice(unique) for _ in range(60)]  # some chosen twice or more: groups of up to 4 copies
    rows = [{"id": f"u{i}", "text": t} for i, t in enumerate(unique)] + \
           [{"id": f"p{i}", "text": t} for i, t in enumerate(planted)]
    rng.shuffle(rows)
    inputs = [write_jsonl(tmp_path / "a.jsonl", rows[:200]), write_jsonl(tmp_path / "b.jsonl", rows[200:])]
    config = CleanConfig(inputs=[str(p) for p in inputs], output_dir=str(tmp_path / "out"), tasks=2, workers=2,
                         minhash=None, **ONLY_DEDUP)
    result = CleanRecipe(config, progress=False).run()

    kept, removed = read_rows(tmp_path / "out" / "kept"), read_rows(tmp_path / "out" / "removed" / "exact_dedup")
    assert len(removed) == len(planted) and result["documents_kept"] == len(unique)
    assert sorted(row["text"] for row in kept) == sorted(unique)  # one of each group kept, every variant kept
    assert all(row["metadata"]["filter_reason"].startswith("exact duplicate") for row in removed)
    assert [r["removed"] for r in result["stages"] if r["stage"] == "exact_dedup"] == [len(planted)]


@pytest.mark.slow  # 13-25 s on 2 busy cores; 2,000 pairs per level in benchmarks/clean_throughput.py
def test_minhash_detection_rates_lie_within_three_standard_errors_of_lsh_theory(tmp_path):
    table = detection_rates(pairs=500, workdir=tmp_path, workers=2)
    assert [row["similarity"] for row in table] == list(SIMILARITIES)
    for row in table:
        # the planted pairs have the target Jaccard over datatrove's own shingles, to within rounding k to a whole shingle
        # (J moves in steps of about 2 * 100 / (200 - k)^2 = 0.0144 at s = 0.7: within half a step)
        assert abs(row["jaccard_min"] - row["similarity"]) < 0.0075 and abs(row["jaccard_max"] - row["similarity"]) < 0.0075
        assert (row["bands"], row["rows"]) == (14, 8)
        assert abs(row["rate"] - row["theory"]) <= 3 * row["se"], row
        assert row["both_removed"] == 0  # a detected pair keeps one of its two documents


def _normalized_tokens(text: str) -> list[str]:
    from datatrove.utils.text import simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    return load_word_tokenizer("en").word_tokenize(simplify_text(text, decontamination_config(13).norm_config))


def _ngrams(tokens: list[str], n: int = 13) -> set[str]:
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def test_decontamination_catches_every_planted_heldout_13gram_and_no_clean_document(tmp_path):
    from yulan_tune.data.bundled import stdlib_documents

    rng = random.Random(2)
    heldout = heldout_math_texts()
    rows = []
    for index, item in enumerate(heldout):  # one planted 13-gram window per held-out problem, inside clean prose
        tokens = _normalized_tokens(item.query) + _normalized_tokens(item.label)
        start = rng.randrange(len(tokens) - 13 + 1)
        rows.append({"id": f"plant-{index}", "text": prose(rng, 60) + "\n\n" + " ".join(tokens[start:start + 13])
                     + "\n\n" + prose(rng, 60)})
    rows += [{"id": f"clean-{i}", "text": prose(rng)} for i in range(200)]
    rows += [{"id": f"stdlib-{i}", "text": text} for i, text in enumerate(stdlib_documents(limit=100))]
    config = CleanConfig(inputs=[str(write_jsonl(tmp_path / "in.jsonl", rows))], output_dir=str(tmp_path / "out"),
                         tasks=2, workers=2, decontaminate=["math-test"], exact_dedup=False, minhash=None,
                         **ONLY_DEDUP)
    result = CleanRecipe(config, progress=False).run()
    removed = read_rows(tmp_path / "out" / "removed" / "decontamination")
    assert sorted(r["id"] for r in removed) == sorted(f"plant-{i}" for i in range(len(heldout)))
    assert all(r["metadata"]["contaminated_task"] == "math-test" for r in removed)
    assert result["decontamination_index"]["math-test"] > 0


def test_decontamination_agrees_with_a_brute_force_13gram_overlap_on_the_bundled_math_train_split(tmp_path):
    """The train split's problems come from the same templates as the held-out ones, so some share 13 words of
    template text with a held-out problem (e.g. "bags with 6 marbles in each bag how many marbles is that in"); the
    filter must flag exactly those and no other."""
    from datatrove.data import Document
    from datatrove.pipeline.decont import NGramsDecontFilter

    from yulan_tune.data.bundled import math_text_documents
    from yulan_tune.data.cleaning import EvalSetIndex

    heldout = heldout_math_texts()
    EvalSetIndex(decontamination_config(13)).write(heldout, tmp_path / "index")
    decont = NGramsDecontFilter(str(tmp_path / "index"), config=decontamination_config(13))
    heldout_ngrams = set().union(*(_ngrams(_normalized_tokens(t.query) + _normalized_tokens(t.label))
                                   for t in heldout))
    train = math_text_documents()
    flagged = [decont.filter(Document(text=text, id=str(i))) is not True for i, text in enumerate(train)]
    overlapping = [bool(_ngrams(_normalized_tokens(text)) & heldout_ngrams) for text in train]
    assert flagged == overlapping


def test_score_buckets_with_a_fasttext_model_and_a_hugging_face_classifier(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from yulan_tune.tiny import tiny_llama_config, tiny_tokenizer

    # fastText's trainer (fasttext-numpy2-wheel 0.9.2) stops with "Encountered NaN" on some small data sets, and in
    # a process that ran the other tests before it more often than in a fresh one; training is only this test's
    # fixture (our code loads and runs the model): train in a fresh interpreter, drawing another data set on NaN
    fasttext_model = tmp_path / "quality.bin"
    train = ("import sys, fasttext; fasttext.train_supervised(input=sys.argv[1], epoch=10, verbose=0, thread=1)"
             ".save_model(sys.argv[2])")
    for seed in range(3, 13):
        rng = random.Random(seed)
        docs = [{"id": f"d{i}", "text": " ".join("".join(rng.choices("abcdefgh", k=5)) for _ in range(40))
                 + (" river river" if i % 2 else "")} for i in range(80)]
        training = tmp_path / "ft.txt"
        training.write_text("".join(f"__label__{'hq' if 'river' in d['text'] else 'lq'} {d['text']}\n" for d in docs))
        done = subprocess.run([sys.executable, "-c", train, str(training), str(fasttext_model)], capture_output=True,
                              text=True)
        if done.returncode == 0:
            break
        assert "NaN" in done.stderr, done.stderr[-500:]
    inputs = write_jsonl(tmp_path / "in.jsonl", docs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path / "tok"))
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer)
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id or tokenizer.eos_token_id
    classifier = tmp_path / "classifier"
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.save_pretrained(classifier)

    for scorer, label in ((fasttext_model, "hq"), (classifier, "LABEL_1")):
        out = tmp_path / f"out_{scorer.name}"
        config = CleanConfig(inputs=[str(inputs)], output_dir=str(out), name="web", tasks=2, workers=2,
                             exact_dedup=False, minhash=None, scorer=str(scorer), scorer_label=label,
                             min_score_bucket=2, **ONLY_DEDUP)
        result = CleanRecipe(config, progress=False).run()
        kept, removed = read_rows(out / "kept"), read_rows(out / "removed" / "quality_score")
        assert len(kept) + len(removed) == len(docs)
        edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9]
        for path in (out / "kept").rglob("*.jsonl"):  # kept/web_scored_dedup/score_<k>/<rank>.jsonl
            assert path.parent.parent.name == "web_scored_dedup"
            bucket = int(path.parent.name.removeprefix("score_"))
            assert bucket >= 2
            for line in path.read_text().splitlines():
                assert edges[bucket - 1] <= json.loads(line)["metadata"]["quality_score"] < edges[bucket]
        assert all(r["metadata"]["score_subset"] == "web_scored_dedup/score_1" for r in removed)
        assert sum(result["score_buckets"].values()) == len(docs)
        if scorer == fasttext_model:  # the model learned the planted signal: "river" documents score high
            scores = {r["id"]: r["metadata"]["quality_score"] for r in kept + removed}
            river = [scores[d["id"]] for d in docs if "river" in d["text"]]
            plain = [scores[d["id"]] for d in docs if "river" not in d["text"]]
            assert min(river) > max(plain)
        else:  # the stored score is the classifier's own probability of LABEL_1
            model = LlamaForSequenceClassification.from_pretrained(classifier).eval()
            row = (kept + removed)[0]
            with torch.inference_mode():
                logits = model(**tokenizer(row["text"], return_tensors="pt")).logits
            assert torch.softmax(logits, -1)[0, 1].item() == pytest.approx(row["metadata"]["quality_score"], abs=1e-4)


def test_clean_command_feeds_prepare_data_reruns_byte_identical_and_resumes(tmp_path, yulan_home, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from yulan_tune.tiny import tiny_tokenizer

    rng = random.Random(4)
    words = "the of and to in is that for it with as on be at by this river city market water".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(8, 14))).capitalize() + "."

    texts = [" ".join(sentence() for _ in range(10)) for _ in range(60)]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"text": t} for t in texts[:30]] + [{"text": texts[0]}, {"text": ""}])
    pq.write_table(pa.table({"text": texts[30:50]}), data / "b.parquet")
    (data / "txt").mkdir()
    for i, text in enumerate(texts[50:]):
        (data / "txt" / f"{i}.txt").write_text(text)
    web = str(CONFIGS / "clean_web.yaml")
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert cli_main(["clean", str(data), "--out", str(out), "--config", web, "--decontaminate", "math-test",
                         "lm-eval:yulan_math", "--no-progress"]) == 0
    metrics = json.loads((first / "yulan_tune_metrics.json").read_text())
    assert set(metrics["decontamination_index"]) == {"math-test", "lm-eval_yulan_math"}
    stages = {row["stage"]: row for row in metrics["stages"]}
    assert stages["read"]["in"] == 62 and stages["read"]["detail"]["no_text"] == 1
    assert stages["exact_dedup"]["removed"] == 1
    assert (tree_digest(first / "kept"), tree_digest(first / "removed")) == \
           (tree_digest(second / "kept"), tree_digest(second / "removed"))
    assert "clean: read" in capsys.readouterr().out

    # rerunning into the same directory resumes (every task is done: nothing changes)
    before = tree_digest(first / "kept")
    assert cli_main(["clean", str(data), "--out", str(first), "--config", web, "--decontaminate", "math-test",
                     "lm-eval:yulan_math", "--no-progress"]) == 0
    assert tree_digest(first / "kept") == before

    tokenizer = tiny_tokenizer()
    assert cli_main(["prepare-data", str(first / "kept"), "--tokenizer", str(tokenizer), "--out",
                     str(tmp_path / "packed"), "--seq-len", "64", "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["documents"] == metrics["documents_kept"] > 0


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    out = tmp_path / "out"
    assert cli_main(["clean", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2" in err[0] and "not valid JSON" in err[0]
    assert cli_main(["clean", str(tmp_path / "missing.jsonl"), "--out", str(out), "--no-progress"]) == 2
    assert cli_main(["clean", str(bad), "--out", str(out), "--decontaminate", str(tmp_path / "no.jsonl")]) == 2
    # with on_bad_rows: skip the bad row is counted, not silently dropped
    config = CleanConfig(inputs=[str(bad)], output_dir=str(tmp_path / "skip"), on_bad_rows="skip",
                         exact_dedup=False, minhash=None, **ONLY_DEDUP)
    result = CleanRecipe(config, progress=False).run()
    assert result["stages"][0]["detail"]["bad_rows"] == 1 and result["documents_kept"] == 1


def test_cached_tokenizer_gives_datatrove_tokens_sentences_and_spans_and_pickles():
    import pickle

    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from benchmarks.clean_throughput import web_documents
    from yulan_tune.data.bundled import stdlib_documents
    from yulan_tune.data.cleaning import CachedSpacyTokenizer

    reference = load_word_tokenizer("en")  # datatrove's: a spaCy memory zone per call
    ours = pickle.loads(pickle.dumps(CachedSpacyTokenizer("en", refresh_every=4)))  # rebuilt twice over 12 texts
    texts = [d["text"] for d in web_documents(8)] + stdlib_documents(limit=2) + [
        "Dr. Smith's e-mail (smith@example.org) said: \"It's 3.5% -- isn't it?\" Yes!", "naïve café ½ “quotes”"]
    for text in texts:
        assert ours.word_tokenize(text) == reference.word_tokenize(text)
        assert ours.sent_tokenize(text) == reference.sent_tokenize(text)
        assert ours.span_tokenize(text) == reference.span_tokenize(text)


@pytest.mark.parametrize("name", ["clean_web.yaml", "clean_code.yaml", "clean_math.yaml"])
def test_shipped_clean_configs_parse(name):
    config = parse_config(["--config", str(CONFIGS / name), "--inputs", "x.jsonl", "--output_dir", "out"])
    assert config.minhash == {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "seed": 1}
    assert config.decontamination_ngrams == 13
    if name == "clean_math.yaml":
        assert config.decontaminate == ["math-test"] and config.fineweb_quality is None
