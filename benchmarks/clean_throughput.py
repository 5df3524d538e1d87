"""`yulan-tune clean` at scale and MinHash detection against theory, on generated documents.

    python -m benchmarks.clean_throughput                  # 100k documents, rerun, 20k for memory; 2000 pairs/level
    python -m benchmarks.clean_throughput --documents 20000 --pairs 500     # quicker

1. MinHash detection rates. For each Jaccard similarity s in 0.5 / 0.7 / 0.8 / 0.9, `pairs` document pairs whose
   Jaccard similarity over datatrove's own shingle sets (MinhashDedupSignature.get_shingles: word 5-grams of the
   normalized text, hashed) is s to within half a shingle (each pair is measured and its own s used); words are drawn
   from 5,000 random letter strings, so pairs share no 5-gram with one another (chance 5,000^-5 per two 5-grams). The whole set runs through `clean` with only
   MinHash on; a pair is detected when one of its two documents lands in removed/minhash_dedup. Theory: 1 - (1 -
   s^r)^b for the configured b bands of r rows, averaged over the pairs' measured s; SE = sqrt(p (1 - p) / pairs).
2. Throughput and memory. `documents` generated web-like documents (Zipf-distributed pseudo-words with English stop
   words) in 8 JSONL shards, with planted exact duplicates (1%), near duplicates (1%), low-quality documents (2%:
   too short, repeated lines) and copies of a held-out math 13-gram (0.1%); `yulan-tune clean` runs the shipped web
   config with `--decontaminate math-test` as a subprocess: wall time, documents per second, the peak RSS of its
   largest process (getrusage RUSAGE_CHILDREN: the main process or any datatrove worker). Run twice into two output
   directories: the kept/ and removed/ trees must be byte-identical. A second size shows whether the peak RSS grows
   with the input.
3. Word tokenization, the cost of every word-level block: datatrove's English tokenizer against ours
   (`CachedSpacyTokenizer`, the same tokens with spaCy's cache kept) on the same 1,000 documents, alternating.
4. Decontamination: planted held-out 13-grams caught, and the documents of clean sets flagged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yulan_tune.paths import RECIPES_DIR, REPO_ROOT  # noqa: E402

SIMILARITIES = (0.5, 0.7, 0.8, 0.9)
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "on", "as")


def random_word(rng: random.Random, length: int = 9) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=length))


def pair_vocabulary(seed: int = 0, size: int = 5_000) -> list[str]:
    # a fixed pool of letter strings (a word tokenizer keeps one entry per distinct string: fresh words for every pair
    # would make it the bottleneck); two 5-grams of independent draws from it coincide with probability 5,000^-5
    rng = random.Random(f"pair-vocabulary-{seed}")
    return [random_word(rng) for _ in range(size)]


def near_duplicate_pair(similarity: float, rng: random.Random, vocabulary: list[str], shingles: int = 100,
                        n_grams: int = 5) -> tuple[str, str]:
    """Two documents of random words whose word `n_grams`-shingle sets have Jaccard `similarity` (to within
    rounding): B keeps A's first words and replaces the rest, so they share k of their `shingles` shingles each and
    J = k / (2 * shingles - k)."""
    words = shingles + n_grams - 1
    shared = round(2 * similarity * shingles / (1 + similarity))  # k
    first = rng.choices(vocabulary, k=words)
    keep = shared + n_grams - 1  # the first `keep` words hold exactly `shared` whole shingles
    # each replacement differs from the word it replaces: else the shared prefix (and J) would grow by chance
    second = first[:keep] + [next(w for w in iter(lambda: rng.choice(vocabulary), None) if w != original)
                             for original in first[keep:]]
    return " ".join(first), " ".join(second)


def planted_pairs(similarity: float, pairs: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{similarity}-{seed}")
    vocabulary = pair_vocabulary(seed)
    rows = []
    for index in range(pairs):
        a, b = near_duplicate_pair(similarity, rng, vocabulary)
        rows += [{"id": f"s{similarity}-{index}-a", "text": a}, {"id": f"s{similarity}-{index}-b", "text": b}]
    return rows


def shingle_jaccard(a: str, b: str, signer) -> float:
    """Jaccard similarity of two texts over the shingle sets datatrove's MinHash stage actually hashes."""
    sa, sb = set(signer.get_shingles(a).ravel().tolist()), set(signer.get_shingles(b).ravel().tolist())
    return len(sa & sb) / len(sa | sb)


def detection_rates(pairs: int, workdir: Path, seed: int = 0, workers: int = 2) -> list[dict]:
    """MinHash detection per similarity level, against 1 - (1 - s^r)^b (see the module docstring)."""
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupSignature

    from yulan_tune.data.cleaning import CleanConfig, CleanRecipe, minhash_detection_probability, word_tokenizer

    rows = [row for s in SIMILARITIES for row in planted_pairs(s, pairs, seed)]
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = CleanConfig(inputs=[str(data)], output_dir=str(workdir / "pairs_out"), tasks=2, workers=workers,
                         unicode=None, gopher_quality=None, gopher_repetition=None, c4_quality=None,
                         fineweb_quality=None,
                         exact_dedup=False)
    result = CleanRecipe(config, progress=False).run(overwrite=True)
    minhash = MinhashConfig(**config.minhash)
    bands, rows_per_band = minhash.num_buckets, minhash.hashes_per_bucket
    removed = set()
    for path in (workdir / "pairs_out" / "removed" / "minhash_dedup").glob("*.jsonl"):
        removed |= {json.loads(line)["id"] for line in path.read_text().splitlines()}
    signer = MinhashDedupSignature(output_folder=str(workdir / "unused"), config=minhash,
                                   language=word_tokenizer(config))
    by_id = {row["id"]: row["text"] for row in rows}
    table = []
    for s in SIMILARITIES:
        ids = [(f"s{s}-{i}-a", f"s{s}-{i}-b") for i in range(pairs)]
        jaccards = [shingle_jaccard(by_id[a], by_id[b], signer) for a, b in ids]
        detected = sum(a in removed or b in removed for a, b in ids)
        both = sum(a in removed and b in removed for a, b in ids)
        p = sum(minhash_detection_probability(j, bands, rows_per_band) for j in jaccards) / pairs
        se = math.sqrt(p * (1 - p) / pairs)
        rate = detected / pairs
        table.append({"similarity": s, "jaccard_min": min(jaccards), "jaccard_max": max(jaccards), "pairs": pairs,
                      "detected": detected, "both_removed": both, "rate": rate, "theory": p, "se": se,
                      "z": (rate - p) / se if se > 0 else 0.0, "bands": bands, "rows": rows_per_band})
    assert result["stages"][-1]["removed"] == len(removed)
    return table


def decontamination_check(seed: int = 0) -> dict:
    """Held-out math decontamination: one random 13-token window of each held-out problem (prompt + solution, as the
    index sees them) planted inside clean prose must be caught; the bundled math train split and standard-library
    sources are counted as they are (the train split shares template text with the held-out problems)."""
    from datatrove.data import Document
    from datatrove.pipeline.decont import NGramsDecontFilter
    from datatrove.utils.text import simplify_text

    from yulan_tune.data.bundled import math_text_documents, stdlib_documents
    from yulan_tune.data.cleaning import (
        CachedSpacyTokenizer,
        EvalSetIndex,
        decontamination_config,
        heldout_math_texts,
    )

    config, tokenizer = decontamination_config(13), CachedSpacyTokenizer()
    rng = random.Random(seed)
    heldout = heldout_math_texts()
    with tempfile.TemporaryDirectory() as index:
        EvalSetIndex(config, tokenizer).write(heldout, index)
        decont = NGramsDecontFilter(index, config=config, language=tokenizer)

        def flagged(texts: list[str]) -> int:
            return sum(decont.filter(Document(text=t, id=str(i))) is not True for i, t in enumerate(texts))

        def tokens(text: str) -> list[str]:
            return tokenizer.word_tokenize(simplify_text(text, config.norm_config))

        vocabulary = pair_vocabulary(seed)
        plants = []
        for item in heldout:
            words = tokens(item.query) + tokens(item.label)
            start = rng.randrange(len(words) - 12)
            plants.append(" ".join(rng.choices(vocabulary, k=60)) + "\n\n" + " ".join(words[start:start + 13])
                          + "\n\n" + " ".join(rng.choices(vocabulary, k=60)))
        train, stdlib = math_text_documents(), stdlib_documents(limit=400)
        return {"planted": len(plants), "planted_caught": flagged(plants), "math_train": len(train),
                "math_train_flagged": flagged(train), "stdlib": len(stdlib), "stdlib_flagged": flagged(stdlib)}


def tokenizer_comparison(documents: int = 1000, reps: int = 3) -> dict:
    """Word tokenization of the same generated documents by datatrove's English tokenizer (a spaCy memory zone per
    call) and by ours (the cache kept), alternating, `reps` times each: seconds per pass (the lowest) and the ratio."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from yulan_tune.data.cleaning import CachedSpacyTokenizer

    texts = [row["text"] for row in web_documents(documents, seed=1)]
    sides = {"datatrove": load_word_tokenizer("en"), "cached": CachedSpacyTokenizer("en")}
    for tokenizer in sides.values():
        tokenizer.word_tokenize(texts[0])  # build the pipeline outside the timing
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, tokenizer in sides.items():
            started = time.perf_counter()
            for text in texts:
                tokenizer.word_tokenize(text)
            seconds[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in seconds.items()}
    return {"documents": documents, "seconds": seconds, "speedup": best["datatrove"] / best["cached"]}


def web_documents(n: int, seed: int = 0) -> list[dict]:
    """`n` generated web-like documents with planted exact duplicates (1%), near duplicates (1%), low-quality
    documents (2%) and held-out math 13-grams (0.1%); ids say which."""
    from yulan_tune.data.cleaning import heldout_math_texts

    rng = random.Random(seed)
    vocabulary = [random_word(rng, rng.randint(3, 9)) for _ in range(20000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    heldout = heldout_math_texts()

    def sentence() -> str:
        words = rng.choices(vocabulary, weights, k=rng.randint(8, 18))
        for _ in range(rng.randint(2, 5)):
            words.insert(rng.randrange(len(words)), rng.choice(STOP_WORDS))
        return " ".join(words).capitalize() + "."

    def document() -> str:
        return "\n\n".join(" ".join(sentence() for _ in range(rng.randint(2, 4))) for _ in range(rng.randint(2, 4)))

    docs: list[dict] = []
    for index in range(n):
        roll = rng.random()
        if roll < 0.01 and docs:
            docs.append({"id": f"exact-{index}", "text": rng.choice(docs)["text"]})
        elif roll < 0.02 and docs:
            words = rng.choice(docs)["text"].split(" ")
            for _ in range(max(1, len(words) // 20)):  # about 5% of the words changed
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            docs.append({"id": f"near-{index}", "text": " ".join(words)})
        elif roll < 0.03:
            docs.append({"id": f"short-{index}", "text": sentence()})
        elif roll < 0.04:
            docs.append({"id": f"repeat-{index}", "text": "\n".join([sentence()] * 12)})
        elif roll < 0.041:
            item = rng.choice(heldout)
            docs.append({"id": f"heldout-{index}", "text": document() + "\n\n" + item.query + " " + item.label})
        else:
            docs.append({"id": f"doc-{index}", "text": document()})
    return docs


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_clean(inputs: Path, out: Path, workers: int) -> dict:
    """`yulan-tune clean` as a subprocess: wall time and the peak RSS of its largest process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.time()
    command = [sys.executable, "-m", "yulan_tune.cli", "clean", str(inputs), "--out", str(out), "--config",
               str(RECIPES_DIR / "configs" / "clean_web.yaml"), "--decontaminate", "math-test", "--workers",
               str(workers), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"clean failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    metrics = json.loads((out / "yulan_tune_metrics.json").read_text())
    return {"seconds": seconds, "documents_per_second": metrics["documents_read"] / seconds,
            "peak_rss_mib": peak / 1024, "peak_rss_is_new_max": peak > before, "stages": metrics["stages"],
            "kept": metrics["documents_kept"], "read": metrics["documents_read"],
            "kept_digest": tree_digest(out / "kept"), "removed_digest": tree_digest(out / "removed")}


def write_inputs(docs: list[dict], folder: Path, shards: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with (folder / f"part-{shard:02d}.jsonl").open("w") as handle:
            for row in docs[shard::shards]:
                handle.write(json.dumps(row) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--small-documents", type=int, default=20_000, help="second size, for the memory trend")
    parser.add_argument("--pairs", type=int, default=2000, help="planted pairs per similarity level")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="datatrove's English word tokenizer against ours, on the same documents")
    parser.add_argument("--decontamination", action=argparse.BooleanOptionalAction, default=True,
                        help="the held-out math decontamination check")
    parser.add_argument("--out", default="benchmarks/results/clean_throughput.json")
    args = parser.parse_args(argv)
    report: dict = {"measured_under_contention": True, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tokenizer:
            report["tokenizer"] = tokens = tokenizer_comparison()
            print(f"word tokenization of {tokens['documents']} documents: datatrove "
                  f"{min(tokens['seconds']['datatrove']):.2f} s, cached {min(tokens['seconds']['cached']):.2f} s "
                  f"({tokens['speedup']:.1f}x)", flush=True)
        if args.decontamination:
            report["decontamination"] = check = decontamination_check()
            print(f"decontamination: planted held-out 13-grams caught {check['planted_caught']}/{check['planted']}; "
                  f"flagged: bundled math train {check['math_train_flagged']}/{check['math_train']}, stdlib "
                  f"{check['stdlib_flagged']}/{check['stdlib']}", flush=True)
        if args.pairs:
            report["minhash"] = detection_rates(args.pairs, work, workers=args.workers)
            for row in report["minhash"]:
                print(f"s={row['similarity']}: detected {row['detected']}/{row['pairs']} = {row['rate']:.4f}, "
                      f"theory {row['theory']:.4f} +- {row['se']:.4f} (z = {row['z']:+.2f}; J in "
                      f"[{row['jaccard_min']:.4f}, {row['jaccard_max']:.4f}], b={row['bands']} r={row['rows']})",
                      flush=True)
        for size in [s for s in (args.small_documents, args.documents) if s]:
            inputs = write_inputs(web_documents(size), work / f"in{size}")
            first = run_clean(inputs, work / f"out{size}a", args.workers)
            row = {"documents": size, "first": first}
            if size == args.documents:
                second = run_clean(inputs, work / f"out{size}b", args.workers)
                row["second"] = second
                row["byte_identical"] = (first["kept_digest"], first["removed_digest"]) == (
                    second["kept_digest"], second["removed_digest"])
            report.setdefault("runs", []).append(row)
            print(f"{size:,} documents: {first['documents_per_second']:.0f} docs/s ({first['seconds']:.0f} s), peak "
                  f"RSS {first['peak_rss_mib']:.0f} MiB, kept {first['kept']:,}"
                  + (f"; rerun {row['second']['seconds']:.0f} s, byte-identical: {row['byte_identical']}"
                     if "second" in row else ""), flush=True)
            for stage in first["stages"]:
                print(f"    {stage['stage']:<18} in {stage['in']:>8,} removed {stage['removed']:>7,}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
