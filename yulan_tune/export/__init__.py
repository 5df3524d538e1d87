"""Export a trained model for serving: a merged plain Llama directory (`hf`), a GGUF file for llama.cpp (`gguf`) and
an Ollama Modelfile next to it (`ollama`).

Every source becomes one plain `LlamaForCausalLM` first (`hf.load_for_export`): a Llama directory as it is, a LoRA
adapter merged into its base (into the dequantized weights for a QLoRA adapter), a yulanmini checkpoint folded into
the released Llama form with `modeling.convert.to_llama`. The writers only ever see that Llama and its tokenizer.
"""

from yulan_tune.export.hf import (
    ADAPTER_INFO,
    load_for_export,
    merge_adapter,
    merged_model,
    read_adapter_info,
    save_hf,
    write_adapter_info,
)

__all__ = ["ADAPTER_INFO", "load_for_export", "merge_adapter", "merged_model", "read_adapter_info", "save_hf",
           "write_adapter_info"]
