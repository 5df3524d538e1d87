"""The config fields SFT and DPO share: trl's `ModelConfig` (how the model is loaded, quantized and LoRA-adapted,
read by trl's `get_peft_config` / `get_quantization_config`), with YuLan defaults, plus the chat template and the
bad-row policy.

A YAML that works with trl's own scripts (`model_name_or_path`, `dtype`, `use_peft`, `lora_r`, `load_in_4bit`, ...)
works here unchanged.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import trl

from yulan_tune.data.records import check_bad_row_policy, parse_columns

# every projection of a Llama block: LoRA on all of them is what QLoRA (Dettmers et al. 2023) found necessary to match
# full fine-tuning; peft's default for Llama is q_proj and v_proj only
ALL_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def liger_kernels_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast trains the tiny YuLan ~1.5x
    faster end to end; elsewhere it is emulated and slower (docs/tiny_model.md). torch has no public query for it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def native_bf16_overrides() -> list[str]:
    """`--bf16 true` on a machine without CUDA whose CPU computes bf16 natively, else nothing (the defaults then
    hold: trl's on a GPU, fp32 on a CPU without bf16 units, where emulated bf16 is slower)."""
    return ["--bf16", "true"] if not torch.cuda.is_available() and cpu_has_bf16_units() else []


def resolve_cpu_precision(args) -> None:
    """On a machine without CUDA: fp32 unless `bf16` was asked for, and `use_cpu` when it was.

    trl defaults bf16 to True. On a CPU fp32 is exact, and faster where the CPU has no bf16 units; where it has them
    (AVX512-BF16 / AMX), `bf16: true` trains the tiny YuLan about 2x faster (docs/tiny_model.md). transformers accepts
    bf16 on a CPU only with use_cpu, and there is no GPU to ask for. Nothing to pin memory for either (torch warns on
    every dataloader otherwise).
    """
    if torch.cuda.is_available():
        return
    if args.bf16 is None:
        args.bf16 = False
    args.use_cpu = args.use_cpu or bool(args.bf16)
    args.dataloader_pin_memory = False


@dataclass
class PostTrainingModelConfig(trl.ModelConfig):
    """trl.ModelConfig with YuLan defaults, plus the chat template and the bad-row policy (for DPO, a LoRA run's
    reference model is the policy with the adapter disabled)."""

    model_name_or_path: str = field(default="tiny", metadata={"help": "hub id, local dir, or 'tiny'"})
    dtype: str | None = field(default=None, metadata={
        "help": "float32, bfloat16, float16, auto; default: bf16 where the GPU has it, else fp32"})
    attn_implementation: str | None = field(default="auto", metadata={
        "help": "auto (flash_attention_2 on CUDA where flash-attn is installed, else sdpa), sdpa, eager, "
                "flash_attention_2"})

    lora_target_modules: list[str] | None = field(default_factory=lambda: list(ALL_LINEAR_LAYERS), metadata={
        "help": "modules that get LoRA adapters (default: every projection of a block)"})
    use_bnb_nested_quant: bool = field(default=True, metadata={
        "help": "4-bit: quantize the quantization constants too (QLoRA's double quantization)"})
    chat_template: str | None = field(
        default=None, metadata={"help": "a name in chat_templates/ or a .jinja path; default: the model's own"}
    )
    on_bad_rows: str = field(
        default="raise", metadata={"help": "'raise' stops at the first invalid row; 'skip' counts and reports it"}
    )
    columns: dict | str | None = field(default=None, metadata={
        "help": "the dataset's column names for our fields, e.g. {prompt: question, completion: answer} or "
                "'chosen=chosen_messages,rejected=rejected_messages' (dataset and eval_dataset)"})

    def resolve_model_fields(self) -> None:
        """The checks trl.ModelConfig.__post_init__ makes, and ours (TrainingArguments' __post_init__ runs instead
        of trl.ModelConfig's in the combined configs); activation checkpointing on unless set (trl's default, under
        the current name; a config that sets the deprecated `gradient_checkpointing` keeps its value)."""
        if getattr(self, "activation_checkpointing", None) is None and getattr(self, "gradient_checkpointing",
                                                                               None) is None:
            self.activation_checkpointing = True
        if getattr(self, "use_liger_kernel", None) is None:  # SFTConfig / DPOConfig default it to None: "auto"
            self.use_liger_kernel = liger_kernels_available()
        check_bad_row_policy(self.on_bad_rows)
        self.columns = parse_columns(self.columns)
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit: choose one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("load_in_4bit / load_in_8bit require use_peft: true (a quantized base is trained "
                             "through LoRA adapters)")
