"""The bundled pretraining corpus: text that ships with Python itself, so nothing has to be downloaded.

Code is one of YuLan-Mini's strengths, so the tiny default is pretrained on the running interpreter's standard
library source (plus the docstrings in it, which are its documentation) and on math word problems.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from yulan_tune.data.math_problems import generate_problems


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


def math_documents(n: int = 2000, seed: int = 0) -> list[str]:
    """Math problems with their worked solutions, as plain text (train split only: the test split stays held out)."""
    return [f"Question: {p.question}\nAnswer: {p.solution}" for p in generate_problems(n, seed, "train")]


def bundled_corpus(n_stdlib: int | None = 400, n_math: int = 2000, seed: int = 0) -> list[str]:
    return stdlib_documents(limit=n_stdlib) + math_documents(n_math, seed)
