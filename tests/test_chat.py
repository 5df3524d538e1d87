"""Golden tests for chat rendering and assistant-only loss masks (exact for any chat template)."""

from __future__ import annotations

import pytest

from yulan_tune.data.chat import (
    IGNORE_INDEX,
    ChatTemplateError,
    end_of_turn_ids,
    generation_prompt_ids,
    tokenize_conversation,
)

BOS, EOT = "<s>", "<|eot_id|>"
H = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731

# A template without {% generation %} markers and with a different layout (ChatML), to show masks do not rely on them.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def runs(tokenizer, ids, labels):
    """Decode the trained tokens as contiguous runs, and the untrained ones likewise."""
    trained, untrained, current, state = [], [], [], None
    for token, label in zip(ids, labels):
        is_trained = label != IGNORE_INDEX
        if state is not None and is_trained != state:
            (trained if state else untrained).append(tokenizer.decode(current))
            current = []
        current.append(token)
        state = is_trained
    if current:
        (trained if state else untrained).append(tokenizer.decode(current))
    return trained, untrained


CASES = [
    pytest.param(
        [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
        ["2 + 3 = 5. The answer is 5." + EOT],
        [BOS + H("user") + "What is 2+3?" + EOT + H("assistant")],
        id="single-turn",
    ),
    pytest.param(
        [
            {"role": "system", "content": "You are YuLan-Mini."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ],
        ["Hello!" + EOT, "See you." + EOT],
        [
            BOS + H("system") + "You are YuLan-Mini." + EOT + H("user") + "Hi" + EOT + H("assistant"),
            H("user") + "Bye" + EOT + H("assistant"),
        ],
        id="system-multi-turn",
    ),
    pytest.param(
        [{"role": "user", "content": "你好，世界 🌍"}, {"role": "assistant", "content": "Grüße — ок ✓"}],
        ["Grüße — ок ✓" + EOT],
        [BOS + H("user") + "你好，世界 🌍" + EOT + H("assistant")],
        id="unicode",
    ),
    pytest.param(
        [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
        [EOT],
        [BOS + H("user") + "Say nothing." + EOT + H("assistant")],
        id="empty-assistant-reply",
    ),
]


@pytest.mark.parametrize("messages, expected_trained, expected_untrained", CASES)
def test_golden_masks(tiny_tokenizer, messages, expected_trained, expected_untrained):
    tokens = tokenize_conversation(tiny_tokenizer, messages)
    trained, untrained = runs(tiny_tokenizer, tokens.input_ids, tokens.labels)
    assert trained == expected_trained
    assert untrained == expected_untrained
    assert tokens.input_ids.count(tiny_tokenizer.bos_token_id) == 1 and tokens.input_ids[0] == 1
    eot = tiny_tokenizer.convert_tokens_to_ids(EOT)
    assert eot == 106 and tokens.labels[-1] == eot  # the end-of-turn token is trained
    # labels are either ignored or equal to the token at the same position
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(tokens.input_ids, tokens.labels))


def test_masks_without_generation_markers(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = CHATML
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b c"},
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "e"},
    ]
    tokens = tokenize_conversation(tokenizer, messages)
    trained, untrained = runs(tokenizer, tokens.input_ids, tokens.labels)
    assert trained == ["b c<|im_end|>\n", "e<|im_end|>\n"]
    assert untrained == [BOS + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n",
                         "<|im_start|>user\nd<|im_end|>\n<|im_start|>assistant\n"]


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    # shows only the last assistant turn: rendering a prefix is then not a prefix of the whole
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ':' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ChatTemplateError, match="prefix-stable"):
        tokenize_conversation(tokenizer, messages)


def test_generation_prompt_matches_training_prefix(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 4*4?"}, {"role": "assistant", "content": "16"}]
    prompt = generation_prompt_ids(tiny_tokenizer, messages[:1])
    tokens = tokenize_conversation(tiny_tokenizer, messages)
    assert tokens.input_ids[: len(prompt)] == prompt  # inference sees token for token what training saw
    assert all(label == IGNORE_INDEX for label in tokens.labels[: len(prompt)])
    assert tokens.labels[len(prompt)] != IGNORE_INDEX
    assert end_of_turn_ids(tiny_tokenizer) == [2, 106]


def test_special_token_ids_match_yulan(tiny_tokenizer):
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 102, "<reasoning_step>": 103,
                "<|start_header_id|>": 104, "<|end_header_id|>": 105, "<|eot_id|>": 106}
    assert {t: tiny_tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert tiny_tokenizer.pad_token_id == 102 and tiny_tokenizer.pad_token_id not in end_of_turn_ids(tiny_tokenizer)
