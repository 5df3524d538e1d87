"""yulan_tune: pretrain, anneal and post-train the YuLan-Mini family.

Public names are imported lazily so that `import yulan_tune` stays cheap; the yulanmini architecture is registered
with transformers' Auto classes on import, so `AutoModelForCausalLM.from_pretrained(dir)` loads yulanmini
checkpoints without `trust_remote_code`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_tiny": "yulan_tune.tiny",
    "load_model": "yulan_tune.loading",
    "load_tokenizer": "yulan_tune.loading",
    "SFTConfig": "yulan_tune.sft",
    "SFTRecipe": "yulan_tune.sft",
    "DPOConfig": "yulan_tune.dpo",
    "DPORecipe": "yulan_tune.dpo",
    "GRPOConfig": "yulan_tune.grpo",
    "GRPORecipe": "yulan_tune.grpo",
    "PairsConfig": "yulan_tune.pairs",
    "PairsRecipe": "yulan_tune.pairs",
    "PretrainConfig": "yulan_tune.pretrain",
    "PretrainRecipe": "yulan_tune.pretrain",
    "AnnealConfig": "yulan_tune.anneal",
    "AnnealRecipe": "yulan_tune.anneal",
    "YuLanMiniConfig": "yulan_tune.modeling.yulanmini",
    "YuLanMiniForCausalLM": "yulan_tune.modeling.yulanmini",
    "to_llama": "yulan_tune.modeling.convert",
    "from_llama": "yulan_tune.modeling.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'yulan_tune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def _register_architecture() -> None:
    try:
        importlib.import_module("yulan_tune.modeling.yulanmini")  # registers "yulanmini" with the Auto classes
    except ModuleNotFoundError as error:  # the module itself is missing (partial checkout), not one of its imports
        if error.name != "yulan_tune.modeling.yulanmini":
            raise


_register_architecture()
