"""The data that ships with yulan_tune, so that everything runs offline, and the one place its `bundled:` names mean
something.

Text that ships with Python itself (the running interpreter's standard library source, docstrings included: code is
one of YuLan-Mini's strengths) and generated math word problems with verifiable answers (math is the other).

Each name means one thing, of one kind:

    bundled:math_chat          conversations   a math question (user) and its worked solution (assistant)   SFT
    bundled:math_preferences   pairs           the correct solution (chosen) and a plausible wrong one       DPO
    bundled:math_text          documents       "Question: ...\\nAnswer: ..." as plain text (train split)
    bundled:arithmetic         documents       the problems' calculation steps as tables ("7 + 5 = 12."), shuffled
    bundled:stdlib             documents       standard-library source files
    bundled:corpus             documents       bundled:stdlib followed by bundled:math_text
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sysconfig
from pathlib import Path

from yulan_tune.data.formats import SFTExample
from yulan_tune.data.math_problems import arithmetic_facts, generate_problems, math_messages
from yulan_tune.data.packing import prepare_packed_dataset

BUNDLED_PREFIX = "bundled:"
MATH_CHAT = "bundled:math_chat"
MATH_PREFERENCES = "bundled:math_preferences"
MATH_TEXT = "bundled:math_text"
ARITHMETIC = "bundled:arithmetic"
STDLIB = "bundled:stdlib"
CORPUS = "bundled:corpus"
DOCUMENT_SETS = (CORPUS, MATH_TEXT, ARITHMETIC, STDLIB)
BUNDLED_NAMES = {MATH_CHAT: "conversations", MATH_PREFERENCES: "preference pairs", MATH_TEXT: "documents",
                 ARITHMETIC: "documents", STDLIB: "documents", CORPUS: "documents"}


def is_bundled(name: str) -> bool:
    return str(name).startswith(BUNDLED_PREFIX)


def check_bundled(name: str, accepted: tuple[str, ...], what: str) -> str:
    """`name` if it is one of `accepted`, else one line naming what each bundled set is."""
    if name in accepted:
        return name
    known = BUNDLED_NAMES.get(name)
    held = f"{name} holds {known}" if known else f"{name!r} is not a bundled set"
    raise ValueError(f"{held}; {what} accepts {', '.join(accepted)} (kinds: "
                     + ", ".join(f"{n} = {kind}" for n, kind in BUNDLED_NAMES.items()) + ")")


# ------------------------------------------------------------------------------------------------ documents


def stdlib_documents(limit: int | None = None, max_chars: int = 20_000) -> list[str]:
    """Source files of the standard library, sorted by path (deterministic), each cut to `max_chars`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    files += sorted(p for p in stdlib.glob("*/*.py") if "test" not in p.parts[-2] and p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python sources found under {stdlib}; the bundled corpus needs them")
    documents: list[str] = []
    for path in files:
        if limit is not None and len(documents) >= limit:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are not UTF-8 text; the corpus is a sample, not an inventory
        if text.strip():
            documents.append(text[:max_chars])
    return documents


def math_text_documents(n: int = 2000, seed: int = 0, split: str = "train") -> list[str]:
    """Math problems with their worked solutions as plain text (the train split unless told: test stays held out)."""
    return [f"Question: {p.question}\nAnswer: {p.solution}" for p in generate_problems(n, seed, split)]


def arithmetic_documents(passes: int = 40, seed: int = 0, facts_per_document: int = 16) -> list[str]:
    """`passes` shuffled passes over `arithmetic_facts()`, one fact per line, `facts_per_document` lines a document."""
    rng = random.Random(seed)
    facts = arithmetic_facts()
    documents = []
    for _ in range(passes):
        order = rng.sample(facts, len(facts))
        documents += ["\n".join(order[i:i + facts_per_document]) for i in range(0, len(order), facts_per_document)]
    return documents


def bundled_corpus(n_stdlib: int | None = 400, n_math: int = 2000, seed: int = 0) -> list[str]:
    return stdlib_documents(limit=n_stdlib) + math_text_documents(n_math, seed)


def heldout_documents(stdlib_docs: int = 400, heldout_docs: int = 20, math_test: int = 200,
                      seed: int = 0) -> dict[str, list[str]]:
    """Held-out text by domain, never trained on by `prepare_bundled_corpus` with the same arguments: "code" (its
    `stdlib-heldout` standard-library sources) and "math" (its `math-test` problems, the test split)."""
    stdlib = stdlib_documents(limit=stdlib_docs + heldout_docs)
    return {"code": stdlib[stdlib_docs:], "math": math_text_documents(math_test, seed, "test")}


def bundled_documents(name: str) -> list[str]:
    """The documents of a bundled document set (DOCUMENT_SETS)."""
    check_bundled(name, DOCUMENT_SETS, "a text source")
    return {CORPUS: bundled_corpus, MATH_TEXT: math_text_documents, ARITHMETIC: arithmetic_documents,
            STDLIB: stdlib_documents}[name]()


def write_documents_jsonl(documents: list[str], path: str | os.PathLike) -> bool:
    """`documents` as JSON lines {"text": ...} at `path`, written atomically; False when it already held them."""
    path = Path(path)
    content = "".join(json.dumps({"text": text}) + "\n" for text in documents)
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(content, encoding="utf-8")
    staging.replace(path)
    return True


# ------------------------------------------------------------------------------------------------ conversations


def math_chat_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """bundled:math_chat: generated math problems (train split) as user/assistant conversations."""
    return [math_messages(p) + [{"role": "assistant", "content": p.solution}] for p in generate_problems(n, seed)]


def math_chat_examples(n: int, seed: int = 0) -> list[SFTExample]:
    """bundled:math_chat as validated SFT examples, each located by its index."""
    return [SFTExample(messages=messages, text=None, source=MATH_CHAT, line=i, unit="row")
            for i, messages in enumerate(math_chat_conversations(n, seed))]


# ------------------------------------------------------------------------------------------------ packed corpus


def prepare_bundled_corpus(
    data_root: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    seq_len: int,
    stdlib_docs: int = 400,
    heldout_docs: int = 20,
    math_train: int = 2000,
    math_test: int = 200,
    arithmetic_passes: int = 40,
    seed: int = 0,
) -> dict[str, Path]:
    """The bundled corpus as packed datasets under `data_root`: `stdlib` (the first `stdlib_docs` standard-library
    sources), `stdlib-heldout` (the next `heldout_docs`), `math` (worked math problems, train split) and `math-test`
    (the test split, never trained on) and `arithmetic` (`arithmetic_passes` shuffled passes over the problems'
    calculation steps). Prepared once; later calls find them done."""
    stdlib = stdlib_documents(limit=stdlib_docs + heldout_docs)
    if len(stdlib) < stdlib_docs + heldout_docs:
        raise ValueError(f"only {len(stdlib)} stdlib documents found, {stdlib_docs + heldout_docs} requested")
    texts = {
        "stdlib": stdlib[:stdlib_docs],
        "stdlib-heldout": stdlib[stdlib_docs:],
        "math": math_text_documents(math_train, seed, "train"),
        "math-test": math_text_documents(math_test, seed, "test"),
        "arithmetic": arithmetic_documents(arithmetic_passes, seed),
    }
    root = Path(data_root)
    paths = {}
    for name, documents in texts.items():
        if write_documents_jsonl(documents, root / "raw" / f"{name}.jsonl"):
            shutil.rmtree(root / name, ignore_errors=True)  # derived from the old text: prepare it again
        prepare_packed_dataset([root / "raw" / f"{name}.jsonl"], tokenizer, root / name, seq_len=seq_len,
                               num_workers=1, progress=False)
        paths[name] = root / name
    return paths
