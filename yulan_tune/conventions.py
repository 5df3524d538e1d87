"""Token conventions that both the data and the model layer need: the label that means "no loss here", and
YuLan-Mini's special tokens.

YuLan-Mini's tokenizer (docs/yulan_reference.md section 6) has `<s>` = 1 (BOS, added to every input), `</s>` = 2
(EOS), `<pad>` = 102 and `<|eot_id|>` = 106, which ends a chat turn; the tiny YuLan keeps the same strings at the
same ids.
"""

from __future__ import annotations

# Label of a position that is not trained on: the value PyTorch's cross-entropy and transformers' losses ignore.
IGNORE_INDEX = -100
YULAN_PAD_TOKEN = "<pad>"
END_OF_TURN_TOKEN = "<|eot_id|>"
# YuLan-Mini's special tokens at YuLan-Mini's ids; 3..101 are reserved fillers so that <pad> lands on 102.
YULAN_SPECIAL_TOKENS = (
    ["<unk>", "<s>", "</s>"]
    + [f"<|reserved_{i}|>" for i in range(3, 102)]
    + [YULAN_PAD_TOKEN, "<reasoning_step>", "<|start_header_id|>", "<|end_header_id|>", END_OF_TURN_TOKEN]
)
