"""Generation: sampling completions from a model (local transformers, any OpenAI-compatible server, vLLM), YuLan's
synthesis patterns as editable prompt templates, and `synth` (seeds -> verified samples, resumable).

Layer 3 (beside evaluation, export, chat_session): imports verifiers/, loading, data/ and level 0. The transformers
and vLLM backends import torch / vllm only when built, so the OpenAI-compatible path stays light.
"""

from yulan_tune.generation.backends import (
    BACKENDS,
    GenerationError,
    OpenAIBackend,
    SamplingSettings,
    TransformersBackend,
    VLLMBackend,
    make_backend,
    sample_seed,
)

__all__ = ["BACKENDS", "GenerationError", "OpenAIBackend", "SamplingSettings", "TransformersBackend", "VLLMBackend",
           "make_backend", "sample_seed"]
