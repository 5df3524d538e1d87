"""Hidden-state monitor: per-layer RMS / variance / mean of activations, the divergence indicators of YuLan-Mini's
training (docs/yulan_reference.md 3.7; report Figs 3-5 and 7).

Forward hooks read the activations of the training step's own forward passes (no extra forward), only on every
`every_n_steps`-th optimizer step; on other steps the hooks return at once. As in the reference, a statistic is the
mean over token positions of a per-token statistic over the hidden dimension (padding positions included), averaged
over the step's micro-batches. Works on any decoder whose layers sit in an `nn.ModuleList` of blocks with a
`self_attn` submodule: yulanmini, Llama, PEFT-wrapped either.

Logged names (TensorBoard groups them by the part before "/"):
    hidden_states_{rms,var,mean}/embed      input of the first layer (embedding output, x scale_emb for yulanmini)
    hidden_states_{rms,var,mean}/layer_03   output of layer 3 (the residual stream)
    attn_input_{rms,var,mean}/layer_03      input of layer 3's attention (after its norm and WeSaR scalar)
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

STATISTICS = ("rms", "var", "mean")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The first `nn.ModuleList` whose blocks all have a `self_attn` submodule (e.g. `model.model.layers`)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(b, "self_attn") for b in module):
            return module
    raise ValueError(f"no decoder layers found in {type(model).__name__}: the hidden-state monitor looks for an "
                     f"nn.ModuleList of blocks that each have a `self_attn` submodule")


@torch.no_grad()
def hidden_state_statistics(hidden_states: torch.Tensor) -> torch.Tensor:
    """[rms, var, mean]: per-token statistics over the last dimension, averaged over tokens (reference 3.7;
    variance unbiased, as torch.var in the reference)."""
    x = hidden_states.detach().float()
    return torch.stack([x.pow(2).mean(-1).sqrt().mean(), x.var(-1).mean(), x.mean(-1).mean()])


class HiddenStateMonitor(TrainerCallback):
    """Logs hidden-state statistics every `every_n_steps` optimizer steps (default 23, the reference's interval).

    Register it with `monitor.attach(trainer)` rather than `Trainer(callbacks=[...])`: `attach` puts it ahead of the
    reporting callbacks (TensorBoard, W&B), so they receive its metrics in the same log call as the loss. On a
    monitored step it asks the Trainer to log, so the statistics land on the step they were measured at.
    With data parallelism each process measures its own micro-batches; the main process's values are reported.
    """

    def __init__(self, every_n_steps: int = 23, attention_inputs: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.attention_inputs = attention_inputs
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._collecting = False
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Trainer) -> HiddenStateMonitor:
        trainer.callback_handler.callbacks.insert(0, self)  # before the reporting integrations' on_log
        return self

    # hooks -------------------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Register the forward hooks on `model` (done by on_train_begin; public for use outside a Trainer)."""
        self.remove()
        layers = find_decoder_layers(model)
        width = max(2, len(str(len(layers) - 1)))
        self._handles.append(layers[0].register_forward_pre_hook(
            partial(self._record_input, "hidden_states", "embed"), with_kwargs=True))
        for index, layer in enumerate(layers):
            key = f"layer_{index:0{width}d}"
            self._handles.append(layer.register_forward_hook(partial(self._record_output, "hidden_states", key)))
            if self.attention_inputs:
                self._handles.append(layer.self_attn.register_forward_pre_hook(
                    partial(self._record_input, "attn_input", key), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self) -> None:
        self._collecting, self._sums, self._counts = True, {}, defaultdict(int)

    def stop(self) -> dict[str, float]:
        """Stop collecting; return the averaged statistics named as in the module docstring."""
        self._collecting = False
        metrics = {}
        for name, total in self._sums.items():
            prefix, key = name.split("/")
            for statistic, value in zip(STATISTICS, (total / self._counts[name]).tolist()):
                metrics[f"{prefix}_{statistic}/{key}"] = value
        return metrics

    def _record(self, prefix: str, key: str, hidden_states: torch.Tensor) -> None:
        # A checkpointed layer's attention runs again in the backward recompute with the same input; averaging over
        # calls leaves the mean unchanged, because every micro-batch is repeated the same number of times.
        name = f"{prefix}/{key}"
        statistics = hidden_state_statistics(hidden_states)
        self._sums[name] = self._sums[name] + statistics if name in self._sums else statistics
        self._counts[name] += 1

    def _record_output(self, prefix: str, key: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._collecting:
            self._record(prefix, key, output[0] if isinstance(output, tuple) else output)

    def _record_input(self, prefix: str, key: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._collecting:
            self._record(prefix, key, args[0] if args else kwargs["hidden_states"])

    # Trainer events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self.install(model)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if (state.global_step + 1) % self.every_n_steps == 0:  # the step about to run gets this number
            self.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self._collecting:
            self._pending = self.stop()
            control.should_log = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        # the Trainer stored its log_history entry before calling on_log; keep it complete
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.remove()
