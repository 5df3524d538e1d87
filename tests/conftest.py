"""Shared fixtures: one tiny YuLan per test session (building it costs ~15 s on 2 cores; share it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests are CPU-only and offline; keep torch from oversubscribing the 2 cores when several processes run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TESTS_DIR = Path(__file__).resolve().parent
ARTIFACTS_DIR = TESTS_DIR / "artifacts"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def yulan_home(tmp_path_factory) -> Path:
    """A private YULAN_TUNE_HOME so tests never read or write the user's cache."""
    home = tmp_path_factory.mktemp("yulan_home")
    os.environ["YULAN_TUNE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(yulan_home) -> Path:
    """The tiny YuLan (Llama form + tokenizer), briefly pretrained, built once per session."""
    from yulan_tune.tiny import build_tiny

    return build_tiny(yulan_home / "tiny", pretrain_steps=40)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from yulan_tune.loading import load_tokenizer

    return load_tokenizer(tiny_dir)
