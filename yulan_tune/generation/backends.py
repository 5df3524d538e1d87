"""Sampling backends: several completions of the assistant turn for each conversation, from a local transformers
model, from any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, ...), or from vLLM in-process (GPU).

Every backend has `generate(conversations, settings) -> list[list[str]]`: for each conversation, `settings.n`
completions, the chat template applied by the backend (the model's own, or the server's). The same conversation,
settings and seed give the same completions however the conversations are batched, so a resumed synthesis run
regenerates a lost row exactly:

- transformers: sampling by the Gumbel-max trick (an exact sample of softmax(logits / T) after top-p is the argmax of
  the logits plus Gumbel noise), the noise drawn from one `torch.Generator` per (conversation, sample), seeded from
  `sample_seed`; the noise enters through a `LogitsProcessor`, transformers' hook for changing scores, and greedy
  search picks the argmax. Rows of a batch therefore never share random numbers (up to the floating-point effect of
  padding on the logits).
- OpenAI-compatible: one request per (conversation, sample), each with its own `seed` (servers that honour `seed`,
  such as vLLM and llama.cpp, are then deterministic; `n` > 1 in one request is not supported by every server).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

BACKENDS = ("transformers", "openai", "vllm")


class GenerationError(ValueError):
    """A backend could not produce completions (server unreachable after retries, an error answer, a missing
    package); `str()` is one line saying what to fix."""


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1  # completions per conversation
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be at least 1, got {self.n} and {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")


def sample_seed(seed: int, conversation: Sequence[dict], sample: int) -> int:
    """A 31-bit seed for sample `sample` of `conversation`: depends on nothing else (not on batching or order)."""
    key = json.dumps([seed, list(conversation), sample], sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ transformers


def _gumbel_processor(generators: list[Any]) -> Any:
    import torch
    from transformers import LogitsProcessor

    class GumbelNoise(LogitsProcessor):
        """Adds Gumbel(0, 1) noise from each row's own generator; argmax of the result is a sample of the (warped)
        distribution. Filtered tokens (-inf) stay filtered."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators]).to(scores.device)
            uniform = uniform.clamp_(torch.finfo(uniform.dtype).tiny, 1.0 - torch.finfo(uniform.dtype).eps)
            return scores + (-torch.log(-torch.log(uniform))).to(scores.dtype)

    return GumbelNoise()


class TransformersBackend:
    """A local causal LM (any `loading.load_model` source, optionally with a LoRA adapter), batched on its device."""

    def __init__(self, model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                 batch_size: int = 16, quantization: str | None = None, dtype: Any = None) -> None:
        from yulan_tune.loading import load_model, load_tokenizer

        model = load_model(model_dir, adapter=adapter, quantization=quantization, dtype=dtype)
        self._setup(model, load_tokenizer(model_dir), batch_size)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 16) -> TransformersBackend:
        """A backend around a model already in memory (e.g. one a recipe just trained)."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, batch_size)
        return backend

    def _setup(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, conversations: Sequence[list[dict]], settings: SamplingSettings, *,
                 show_progress: bool = False) -> list[list[str]]:
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        from yulan_tune.console import progress
        from yulan_tune.data.chat import end_of_turn_ids, generation_prompt_ids

        prompts = [generation_prompt_ids(self.tokenizer, conversation) for conversation in conversations]
        rows = [(index, sample) for index in range(len(conversations)) for sample in range(settings.n)]
        texts: dict[tuple[int, int], str] = {}
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        starts = range(0, len(rows), self.batch_size)
        for start in progress(starts, desc="sampling", unit="batch", enabled=show_progress, leave=False):
            batch = rows[start:start + self.batch_size]
            width = max(len(prompts[index]) for index, _ in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i, _ in batch],
                                     device=device)
            attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i, _ in batch],
                                          device=device)
            processors = LogitsProcessorList()
            if settings.temperature > 0:
                generators = [torch.Generator().manual_seed(sample_seed(settings.seed, conversations[i], j))
                              for i, j in batch]
                processors.append(TemperatureLogitsWarper(settings.temperature))
                if settings.top_p < 1:
                    processors.append(TopPLogitsWarper(settings.top_p))
                processors.append(_gumbel_processor(generators))
            with torch.no_grad():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             max_new_tokens=settings.max_new_tokens, do_sample=False,
                                             logits_processor=processors, eos_token_id=end_of_turn_ids(self.tokenizer),
                                             pad_token_id=pad_id)
            decoded = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            texts.update(zip(batch, decoded))
        self.model.train(was_training)
        return [[texts[(index, sample)] for sample in range(settings.n)] for index in range(len(conversations))]


# ------------------------------------------------------------------------------------------------ OpenAI-compatible

_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """Any server with an OpenAI-compatible `POST {base_url}/chat/completions`: at most `concurrency` requests in
    flight, each with a `timeout_s` limit and up to `retries` further attempts (exponential backoff) on connection
    errors, timeouts, 429 and 5xx answers. The API key comes from `api_key` or $OPENAI_API_KEY (sent only if set;
    local servers need none)."""

    def __init__(self, base_url: str, model: str, *, concurrency: int = 4, timeout_s: float = 120.0, retries: int = 3,
                 api_key: str | None = None, backoff_s: float = 1.0) -> None:
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"concurrency must be >= 1, retries >= 0 and timeout_s > 0, got {concurrency}, {retries}, "
                             f"{timeout_s}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.timeout_s, self.retries = model, concurrency, timeout_s, retries
        self.backoff_s = backoff_s
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.requests_sent = 0  # attempts, retries included
        self._lock = threading.Lock()

    def _request(self, body: dict) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            with self._lock:
                self.requests_sent += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = error.read()[:300].decode("utf-8", errors="replace").replace("\n", " ")
                last = f"HTTP {error.code}: {message}"
                if error.code not in _RETRYABLE_STATUS:
                    raise GenerationError(f"{self.url}: {last}") from error
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = str(getattr(error, "reason", error))
                continue
            except ValueError as error:  # not JSON
                raise GenerationError(f"{self.url}: the answer is not JSON ({error})") from error
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError) as error:
                raise GenerationError(f"{self.url}: no choices[0].message.content in the answer "
                                      f"{json.dumps(answer)[:200]}") from error
            return content if content is not None else ""
        raise GenerationError(f"{self.url}: {last} (gave up after {self.retries + 1} attempts)")

    def generate(self, conversations: Sequence[list[dict]], settings: SamplingSettings, *,
                 show_progress: bool = False) -> list[list[str]]:
        def body(conversation: list[dict], sample: int) -> dict:
            return {"model": self.model, "messages": conversation, "n": 1, "temperature": settings.temperature,
                    "top_p": settings.top_p, "max_tokens": settings.max_new_tokens,
                    "seed": sample_seed(settings.seed, conversation, sample)}

        jobs = [body(conversation, sample) for conversation in conversations for sample in range(settings.n)]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            flat = list(pool.map(self._request, jobs))  # in order; the first failure is raised here
        return [flat[i * settings.n:(i + 1) * settings.n] for i in range(len(conversations))]


# ------------------------------------------------------------------------------------------------ vLLM


class VLLMBackend:
    """vLLM in this process (a CUDA GPU and the `vllm` package): the fastest way to sample many completions locally.
    Each conversation's request carries its own seed (`sample_seed`), so the output does not depend on batching."""

    def __init__(self, model: str | os.PathLike, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, **engine_options: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as error:
            raise GenerationError("--backend vllm needs the vllm package and a CUDA GPU (pip install vllm); without "
                                  "them use --backend transformers, or --backend openai against a vLLM server") from error
        self.llm = LLM(model=str(model), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False, **engine_options)

    def generate(self, conversations: Sequence[list[dict]], settings: SamplingSettings, *,
                 show_progress: bool = False) -> list[list[str]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                 max_tokens=settings.max_new_tokens, seed=sample_seed(settings.seed, conversation, 0))
                  for conversation in conversations]
        outputs = self.llm.chat(list(conversations), sampling_params=params, use_tqdm=show_progress)
        return [[choice.text for choice in output.outputs] for output in outputs]


def make_backend(name: str, model: str, **options: Any) -> TransformersBackend | OpenAIBackend | VLLMBackend:
    """A backend by name: "transformers" (model: a local dir or hub id; options: adapter, batch_size, quantization,
    dtype), "openai" (model: the server's model name; options: base_url (required), concurrency, timeout_s, retries,
    api_key), "vllm" (model: a dir or hub id; options: vLLM engine arguments)."""
    if name == "transformers":
        return TransformersBackend(model, **options)
    if name == "openai":
        if not options.get("base_url"):
            raise ValueError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(options.pop("base_url"), model, **options)
    if name == "vllm":
        return VLLMBackend(model, **options)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
