"""yulanmini <-> Llama conversion: outputs unchanged both ways (docs/yulan_reference.md section 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from yulan_tune.cli import main as cli_main
from yulan_tune.modeling.convert import from_llama, to_llama
from yulan_tune.modeling.yulanmini import YuLanMiniConfig, YuLanMiniForCausalLM

SHAPES = {
    "gqa": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=192, vocab_size=256, dim_model_base_lr=64),
    # the team's tiny shape (GQA 5:1, head_dim 64)
    "tiny": dict(hidden_size=320, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=1,
                 intermediate_size=832, vocab_size=4096, dim_model_base_lr=64),
    # multi-head, and every optional factor away from 1: softmax scale 4/64, logits x2, ln_scale
    "factors": dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                    intermediate_size=512, vocab_size=512, dim_model_base_lr=64, dim_model_base_attn=16,
                    dim_model_base_logits=384, ln_scale=1.1, rope_theta=490000.0, pad_token_id=0),
}


def random_yulanmini(shape: str, seed: int, **overrides) -> YuLanMiniForCausalLM:
    """Random weights for O(1) logits; scalars, biases and norms randomized so every fold is exercised."""
    torch.manual_seed(seed)
    model = YuLanMiniForCausalLM(YuLanMiniConfig.for_shape(**{**SHAPES[shape], **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_alpha"):
                parameter.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1]))
    return model.eval()


def max_difference(model_a, model_b, input_ids, **kwargs) -> float:
    with torch.no_grad():
        return (model_a(input_ids, **kwargs).logits - model_b(input_ids, **kwargs).logits).abs().max().item()


@pytest.mark.parametrize(("shape", "seed"), [("gqa", 0), ("gqa", 1), ("tiny", 2), ("factors", 3)])
def test_to_llama_and_back_keep_logits(shape, seed):
    model = random_yulanmini(shape, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    llama = to_llama(model)
    assert type(llama) is LlamaForCausalLM and not llama.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.abs().max() > 1  # logits large enough for the tolerance to mean something
    assert max_difference(model, llama, ids) <= 1e-5
    # packed rows: both forms restart RoPE and mask documents from position_ids (Llama only without a cache:
    # with use_cache=True it attends across documents, docs/stack_notes.md)
    position_ids = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, -1)
    assert max_difference(model, llama, ids, position_ids=position_ids, use_cache=False) <= 1e-5

    back = from_llama(llama)
    assert type(back) is YuLanMiniForCausalLM and not back.config.tie_word_embeddings
    assert max_difference(model, back, ids) <= 1e-5
    tied = from_llama(llama, tie_word_embeddings=True)  # the training form: one matrix, ratio in lm_head_alpha
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert max_difference(model, tied, ids) <= 1e-5
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        assert tied(ids, labels=labels).loss.item() == pytest.approx(model(ids, labels=labels).loss.item(), rel=1e-6)


def test_from_llama_divides_the_mup_factors_out():
    llama = to_llama(random_yulanmini("gqa", 7))
    model = from_llama(llama, scale_emb=10.0, dim_model_base_lr=64)
    config = model.config
    assert config.mup_width_multiplier == 2 and config.hidden_states_shrink == pytest.approx(1.4 / math.sqrt(2))
    assert model.model.layers[1].self_attn.o_proj_alpha.item() == pytest.approx((2 * 2 * 2) ** -0.5)
    torch.testing.assert_close(model.model.embed_tokens.weight * 10, llama.model.embed_tokens.weight)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.bias * model.model.layers[0].self_attn.q_proj_alpha,
        llama.model.layers[0].self_attn.q_proj.bias)


def test_greedy_generation_with_kv_cache_matches_the_converted_llama():
    model = random_yulanmini("gqa", 11, pad_token_id=0)
    llama = to_llama(model)
    generator = torch.Generator().manual_seed(11)
    prompts = torch.randint(1, 256, (2, 7), generator=generator)
    attention_mask = torch.ones_like(prompts)
    prompts[1, :3], attention_mask[1, :3] = 0, 0  # left padding
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours, theirs = model.generate(prompts, **kwargs), llama.generate(prompts, **kwargs)
    assert ours.shape == (2, 19)
    assert torch.equal(ours, theirs)


def test_full_size_llama_form_has_the_released_parameter_count():
    with torch.device("meta"):
        model = YuLanMiniForCausalLM(YuLanMiniConfig())
    llama = to_llama(model)
    config = llama.config
    assert not config.tie_word_embeddings and config.attention_bias and config.head_dim == 64
    total = sum(p.numel() for p in llama.parameters())
    o_proj_biases = 56 * 1920
    assert total - o_proj_biases == 2_424_267_648  # docs/yulan_reference.md 1.1: the advertised 2.42B counts the head
    assert total == 2_424_375_168


def test_conversions_refuse_what_they_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="QK-LayerNorm"):
        to_llama(random_yulanmini("gqa", 0, qk_layernorm=True))
    llama = to_llama(random_yulanmini("gqa", 0))
    with pytest.raises(ValueError, match="relative residual of"):
        untied = LlamaForCausalLM(llama.config)
        untied.load_state_dict(llama.state_dict())
        with torch.no_grad():
            untied.lm_head.weight.add_(torch.randn_like(untied.lm_head.weight))
        from_llama(untied, tie_word_embeddings=True)
    with torch.no_grad():
        llama.model.layers[1].self_attn.o_proj.bias[3] = 0.5
    with pytest.raises(ValueError, match="o_proj biases are non-zero"):
        from_llama(llama)
    llama_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                 vocab_size=32)).save_pretrained(llama_dir)
    with pytest.raises(ValueError, match="model_type is 'llama'.*from_llama"):
        to_llama(llama_dir)


def test_convert_cli_round_trip(tmp_path, capsys):
    model = random_yulanmini("gqa", 5)
    source, llama_dir, back_dir = tmp_path / "yulanmini", tmp_path / "llama", tmp_path / "back"
    model.save_pretrained(source)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    assert cli_main(["convert", "--to", "llama", str(source), str(llama_dir)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert json.loads((llama_dir / "config.json").read_text())["model_type"] == "llama"
    assert (llama_dir / "model.safetensors").is_file() and (llama_dir / "tokenizer_config.json").is_file()
    assert cli_main(["convert", "--to", "yulanmini", str(llama_dir), str(back_dir), "--dim-model-base-lr", "64",
                         "--tie-word-embeddings"]) == 0
    back = YuLanMiniForCausalLM.from_pretrained(back_dir)
    assert back.config.tie_word_embeddings and back.config.dim_model_base_lr == 64
    ids = torch.randint(0, 256, (1, 12))
    assert max_difference(model, back, ids) <= 1e-5
    assert cli_main(["convert", "--to", "llama", str(llama_dir), str(tmp_path / "x")]) == 2  # wrong direction
    assert "from_llama / --to yulanmini" in capsys.readouterr().err
