"""Where yulan_tune keeps its cache and finds the files that ship with the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE_DIR = REPO_ROOT / "chat_templates"
RECIPES_DIR = REPO_ROOT / "recipes"
PRETRAIN_DIR = REPO_ROOT / "pretrain"


def cache_home() -> Path:
    """`$YULAN_TUNE_HOME`, else `~/.cache/yulan_tune`."""
    return Path(os.environ.get("YULAN_TUNE_HOME") or Path.home() / ".cache" / "yulan_tune")
# the canonical YuLan-Mini-Instruct chat template (docs/yulan_reference.md section 6)
DEFAULT_CHAT_TEMPLATE = CHAT_TEMPLATE_DIR / "yulan_mini_instruct.jinja"
