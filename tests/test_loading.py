"""Loading: clear errors for missing models, pad never equal to end-of-turn, the template fallback."""

from __future__ import annotations

import time

import pytest

from yulan_tune.loading import DEFAULT_CHAT_TEMPLATE, ModelNotFoundError, load_model, load_tokenizer


@pytest.mark.parametrize("missing", ["/nonexistent/model", "./not/here/model"])
def test_missing_local_model_fails_at_once_with_one_actionable_line(missing):
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as error:
        load_model(missing)
    assert time.monotonic() - started < 5  # no hub retries for something that can only be a path
    message = str(error.value)
    assert missing in message and "yulan-tune tiny" in message and "\n" not in message


def test_unknown_hub_id_offline_says_what_was_looked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model.*huggingface-cli download"):
        load_tokenizer("no-such-org/no-such-model")


def test_pad_is_not_eos_and_template_falls_back(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_dir)
    raw.chat_template = None
    raw.pad_token = raw.eos_token  # a common broken setup: pad == eos would stop the model learning to end turns
    raw.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token_id == 102 and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
