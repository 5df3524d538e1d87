"""The shipped accelerate configs, read the way `accelerate launch` reads them (its own parser and environment), on
both model types the recipes train: the yulanmini training form and the released Llama form."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env
from transformers import LlamaConfig, LlamaForCausalLM

from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
LAYERS = 3


def launch_environment(config_file: Path) -> dict[str, str]:
    """The FSDP / accelerate variables `accelerate launch --config_file X` gives each process."""
    parser = launch_command_parser()
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(config_file), "recipes/sft.py"]))
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def tiny_models():
    shape = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                 intermediate_size=128, vocab_size=128)
    yield YuLanMiniForCausalLM(YuLanMiniConfig.for_shape(**shape, dim_model_base_lr=64))
    yield LlamaForCausalLM(LlamaConfig(**shape))


@pytest.mark.parametrize("model", list(tiny_models()), ids=["yulanmini", "llama"])
def test_fsdp_config_wraps_every_decoder_layer(model):
    """accelerate requires every class a config names to exist in the model: naming both decoder classes wrapped
    nothing at all (a ValueError at prepare). The config names none, so each model's `_no_split_modules` decides."""
    with mock.patch.dict(os.environ, launch_environment(ACCELERATE_CONFIGS / "fsdp.yaml")):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(module).__name__ for module in model.modules() if policy(module)]
    assert len(wrapped) == LAYERS and set(wrapped) == set(model._no_split_modules)


@pytest.mark.parametrize("config_file", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_is_read_by_accelerate_launch(config_file):
    if "deepspeed" in config_file.name:
        pytest.importorskip("deepspeed")  # accelerate's launcher checks that DeepSpeed is installed
    assert launch_environment(config_file)
