"""An Ollama Modelfile for an exported GGUF: `ollama create NAME -f Modelfile`, then `ollama run NAME`.

Ollama does not run the Jinja chat template; it renders its own Go template. The one written here is YuLan-Mini's
chat format (the Llama-3 header layout with YuLan's special tokens, chat_templates/yulan_mini_instruct.jinja) without
the leading `<s>`: llama.cpp adds BOS itself, as the GGUF's `tokenizer.ggml.add_bos_token` says. The stop tokens are
the end of a turn (`<|eot_id|>`) and the end of a sequence (`</s>`), as in the model's generation config.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from yulan_tune.conventions import END_OF_TURN_TOKEN

MODELFILE = "Modelfile"
# `.Messages` holds the system prompt too (Ollama puts it first); a reply is prompted after the last message.
YULAN_OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
DEFAULT_NUM_CTX = 4096  # Ollama's window unless the model's is shorter (a longer one costs memory on every run)


def stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    vocab = tokenizer.get_vocab()
    stops = [END_OF_TURN_TOKEN] if END_OF_TURN_TOKEN in vocab else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def modelfile_text(gguf_name: str, tokenizer: PreTrainedTokenizerBase, *, context_length: int,
                   generation_config: GenerationConfig | None = None, system: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{YULAN_OLLAMA_TEMPLATE}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer)]
    lines.append(f"PARAMETER num_ctx {min(context_length, DEFAULT_NUM_CTX)}")
    config = generation_config
    if config is not None and config.do_sample:  # the model's own sampling settings, when it has any
        for name, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                          ("repetition_penalty", "repeat_penalty")):
            value = getattr(config, name, None)
            if value is not None:
                lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer: PreTrainedTokenizerBase, *, context_length: int,
                    generation_config: GenerationConfig | None = None, system: str | None = None) -> Path:
    """`Modelfile` next to `gguf_path` (FROM the GGUF by its relative name, the template, stop tokens, parameters)."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / MODELFILE
    out.write_text(modelfile_text(gguf_path.name, tokenizer, context_length=context_length,
                                  generation_config=generation_config, system=system), encoding="utf-8")
    return out
