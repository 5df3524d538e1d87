"""The yulanmini architecture against an independent implementation of docs/yulan_reference.md 1.3-1.6."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import yulan_tune  # noqa: F401  (registers "yulanmini" with the Auto classes)
from yulan_tune.modeling.yulanmini import (
    YuLanMiniConfig,
    YuLanMiniForCausalLM,
    causal_lm_loss_with_z_loss,
    mup_alphas,
)

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, vocab_size=256, dim_model_base_lr=64)


def small_model(seed: int = 0, **overrides) -> YuLanMiniForCausalLM:
    """A small yulanmini with weights large enough for O(1) logits and randomized scalars, biases and norms."""
    torch.manual_seed(seed)
    model = YuLanMiniForCausalLM(YuLanMiniConfig.for_shape(**{**SMALL, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_alpha"):
                parameter.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1]))
    return model.eval()


# --- an independent forward, written from the formulas of docs/yulan_reference.md 1.3 over a raw state dict ---------------

def reference_logits(t: dict[str, torch.Tensor], c: dict, ids: torch.Tensor) -> torch.Tensor:
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim, length = hidden // heads, ids.shape[1]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * weight

    angles = torch.outer(torch.arange(length).float(),
                         1.0 / c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def split_heads(x, n):
        return x.view(ids.shape[0], length, n, head_dim).transpose(1, 2)

    rho = c["hidden_states_shrink"]
    h = t["model.embed_tokens.weight"][ids] * c["scale_emb"]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, t[p + "input_layernorm.weight"]) * t[p + "input_layernorm_alpha"]
        q, k, v = ((x @ t[f"{p}self_attn.{n}_proj.weight"].T + t[f"{p}self_attn.{n}_proj.bias"])
                   * t[f"{p}self_attn.{n}_proj_alpha"] for n in "qkv")
        q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = rope(q) @ rope(k).transpose(-1, -2) * math.sqrt(c["dim_model_base_attn"]) / head_dim
        attention = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        attention = attention.transpose(1, 2).reshape(ids.shape[0], length, hidden)
        h = h + rho * (attention @ t[p + "self_attn.o_proj.weight"].T) * t[p + "self_attn.o_proj_alpha"]
        y = rms_norm(h, t[p + "post_attention_layernorm.weight"]) * t[p + "post_attention_layernorm_alpha"]
        y = y * t[p + "gate_up_proj_alpha"]
        mlp = (F.silu(y @ t[p + "mlp.gate_proj.weight"].T) * (y @ t[p + "mlp.up_proj.weight"].T))
        h = h + rho * (mlp @ t[p + "mlp.down_proj.weight"].T) * t[p + "down_proj_alpha"]
    h = rms_norm(h, t["model.norm.weight"]) * t["model.norm_alpha"]
    h = h * (c["dim_model_base_logits"] / hidden) * t["lm_head_alpha"]
    return h @ t["model.embed_tokens.weight"].T  # tied


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> torch.Tensor:
    logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = targets != -100
    cross_entropy = F.cross_entropy(logits[keep], targets[keep])
    return cross_entropy + z_loss * torch.logsumexp(logits[keep], -1).pow(2).mean()


def reference_checkpoint(tmp_path, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write a checkpoint as the reference trainer does: its config.json field names, remote-code auto_map whose
    files do not exist, its state-dict key names and shapes (q/k/v/o scalars [1], the others 0-dim), bf16,
    the tied lm_head saved once as model.embed_tokens.weight."""
    hidden, layers, heads, kv_heads, ffn, vocab = 128, 2, 4, 2, 192, 256
    head_dim = hidden // heads
    config = {
        "_name_or_path": "/home/u20140041/pretrain-mini/output/yulanmini-phase25/checkpoint-243198",
        "architectures": ["YuLanMiniForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_yulanmini.YuLanMiniConfig",
                     "AutoModel": "modeling_yulanmini.YuLanMiniModel",
                     "AutoModelForCausalLM": "modeling_yulanmini.YuLanMiniForCausalLM"},
        "model_type": "yulanmini", "transformers_version": "4.44.0", "torch_dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "use_cache": False, "pad_token_id": None,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 10000.0,
        "use_sliding_window": False, "sliding_window": None, "rope_scaling": None, "attention_bias": True,
        "attention_dropout": 0.0, "shrink_alpha": 1, "shrink_alpha2": 1, "use_liger": True,
        "initializer_range": 5e-05, "init_scale_o": 1, "model_reproduce": "transformer",
        "hidden_states_shrink": 1.4 / math.sqrt(layers), "dim_model_base": hidden, "dim_ffn_base_init": None,
        "dim_model_base_init": None, "dim_model_base_attn": 16,  # softmax scale 4/32, not 1/sqrt(32)
        "dim_model_base_lmh": 1, "dim_model_base_logits": hidden, "dim_model_base_lr": 64, "scale_emb": 10,
        "qk_layernorm": False, "layer_norm_eps": 1e-06, "embedding_ln": False, "embedding_rmsln": False,
        "ln_scale": 1.0, "z_loss": 0.0001, "wesar_weights": True, "embed_tokens_alpha": 1, "q_proj_alpha": 0.7,
        "k_proj_alpha": 0.7, "v_proj_alpha": 0.7, "o_proj_alpha": 0.35, "down_proj_alpha": 0.35,
        "gate_up_proj_alpha": 0.7, "input_layernorm_alpha": 1, "post_attention_layernorm_alpha": 1, "norm_alpha": 1,
        "lm_head_alpha": 1, "use_norm_alpha": True, "use_emb_alpha": False, "rms_type": "llama",
        "num_steps_trained_before_this_epoch": 243198, "num_epochs_trained_before_this_epoch": 25,
        "gradient_checkpointing_step": 12,
    }
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def scalar(shape=()):
        return torch.empty(shape).uniform_(0.5, 2.0, generator=g)

    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.1,
               "model.norm.weight": 1 + 0.2 * torch.randn(hidden, generator=g), "model.norm_alpha": scalar(),
               "lm_head_alpha": scalar()}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows in (("q", hidden), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            tensors[f"{p}self_attn.{name}_proj.weight"] = matrix(rows, hidden)
            tensors[f"{p}self_attn.{name}_proj.bias"] = 0.1 * torch.randn(rows, generator=g)
            tensors[f"{p}self_attn.{name}_proj_alpha"] = scalar((1,))
        tensors[f"{p}self_attn.o_proj.weight"] = matrix(hidden, hidden)
        tensors[f"{p}self_attn.o_proj_alpha"] = scalar((1,))
        tensors[f"{p}mlp.gate_proj.weight"] = matrix(ffn, hidden)
        tensors[f"{p}mlp.up_proj.weight"] = matrix(ffn, hidden)
        tensors[f"{p}mlp.down_proj.weight"] = matrix(hidden, ffn)
        for name in ("gate_up_proj_alpha", "down_proj_alpha", "input_layernorm_alpha",
                     "post_attention_layernorm_alpha"):
            tensors[p + name] = scalar()
        tensors[p + "input_layernorm.weight"] = 1 + 0.2 * torch.randn(hidden, generator=g)
        tensors[p + "post_attention_layernorm.weight"] = 1 + 0.2 * torch.randn(hidden, generator=g)
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return config, tensors


def test_reference_checkpoint_loads_without_remote_code_and_matches_the_formulas(tmp_path):
    config, tensors = reference_checkpoint(tmp_path)
    # as a user would: no trust_remote_code, the auto_map's python files do not exist
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is YuLanMiniForCausalLM and model.dtype == torch.bfloat16
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert all(not keys for keys in info.values()), info  # no missing, unexpected or mismatched keys
    state = model.state_dict()
    assert set(state) == set(tensors) | {"lm_head.weight"}
    for name, tensor in tensors.items():
        assert state[name].shape == tensor.shape and torch.equal(state[name], tensor.float()), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.config.num_steps_trained_before_this_epoch == 243198  # curriculum bookkeeping survives
    assert model.config.rope_parameters["rope_theta"] == 10000.0

    labels = ids.clone()
    labels[0, :4] = -100  # ignored prompt tokens
    with torch.no_grad():
        output = model(ids, labels=labels)
    expected_logits = reference_logits({k: v.float() for k, v in tensors.items()}, config, ids)
    # fp32 rounding only (the model multiplies scalars into weights, the formulas into activations): a few ulps of
    # the largest logit (about 7 here)
    assert (output.logits - expected_logits).abs().max().item() <= 4e-6 * expected_logits.abs().max().item()
    expected_loss = reference_loss(expected_logits, labels, config["z_loss"])
    assert output.loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_gradients_of_every_parameter_match_the_formulas(tmp_path):
    """The model applies each scalar to its weight rather than to the activation (a speed choice): the gradient of
    every matrix and every WeSaR scalar still equals autograd's through the formulas written over activations."""
    config, tensors = reference_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()

    leaves = {name: tensor.float().requires_grad_() for name, tensor in tensors.items()}
    reference_loss(reference_logits(leaves, config, ids), ids, config["z_loss"]).backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert set(gradients) == set(leaves)  # the tied head has no parameter of its own
    for name, leaf in leaves.items():
        assert leaf.grad.abs().max() > 0, name  # every parameter, scalars included, takes part
        torch.testing.assert_close(gradients[name], leaf.grad, rtol=1e-4, atol=1e-5 * leaf.grad.abs().max().item(),
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_loss_is_cross_entropy_plus_z_loss_and_exact_under_gradient_accumulation():
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(4, 9, 50, generator=generator)
    labels = torch.randint(0, 50, (4, 9), generator=generator)
    labels[:, :3] = -100
    labels[1, :] = -100  # a row with nothing to predict
    z_loss = 1e-2  # large, so that the z term matters at this precision
    expected = reference_loss(logits, labels, z_loss)
    assert causal_lm_loss_with_z_loss(logits, labels, z_loss).item() == pytest.approx(expected.item(), rel=1e-6)
    # the Trainer passes the predicted-token count of all micro-batches; the sum of the parts is the whole
    count = (labels[:, 1:] != -100).sum()
    parts = [causal_lm_loss_with_z_loss(logits[i:i + 2], labels[i:i + 2], z_loss, num_items_in_batch=count)
             for i in (0, 2)]
    assert sum(parts).item() == pytest.approx(expected.item(), rel=1e-6)
    # and through the model: num_items_in_batch reaches the loss
    model = small_model()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=generator)
    with torch.no_grad():
        mean_loss = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(1)).loss
    assert summed.item() == pytest.approx(mean_loss.item() * 14, rel=1e-5)  # 2 rows x 7 predicted tokens


def test_full_size_config_builds_on_meta_with_the_reference_parameter_count():
    config = YuLanMiniConfig()  # defaults are the 2.42B run
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (1920, 56, 30, 6, 4800, 99000)
    assert config.hidden_states_shrink == pytest.approx(0.18708286933869706, rel=1e-15)
    assert config.q_proj_alpha == config.k_proj_alpha == config.v_proj_alpha == config.gate_up_proj_alpha
    assert config.q_proj_alpha == pytest.approx(0.3651483716701107, rel=1e-15)  # 1/sqrt(7.5)
    assert config.o_proj_alpha == config.down_proj_alpha == pytest.approx(0.03450327796711771, rel=1e-15)
    assert config.attention_scale == 1 / 8 and config.logits_scale == 1 and config.mup_width_multiplier == 7.5
    assert mup_alphas(1920, 56, 256)["o_proj_alpha"] == pytest.approx(1 / math.sqrt(840), rel=1e-15)
    with torch.device("meta"):
        model = YuLanMiniForCausalLM(config)
    alphas = {name: p.numel() for name, p in model.named_parameters() if name.endswith("_alpha")}
    total = sum(p.numel() for p in model.parameters())  # the tied lm_head counts once
    assert len(alphas) == sum(alphas.values()) == 8 * 56 + 2  # q,k,v,o,gate_up,down,2 norms per layer; norm, lm_head
    assert total - len(alphas) == 2_234_187_648  # docs/yulan_reference.md 1.1 (the Llama form's tied count)
    assert total == 2_234_188_098


def test_fresh_initialization_follows_section_1_5():
    torch.manual_seed(0)
    config = YuLanMiniConfig.for_shape(hidden_size=512, num_hidden_layers=4, dim_model_base_lr=64,
                                       num_attention_heads=8, num_key_value_heads=2, intermediate_size=1280,
                                       vocab_size=8192)
    model = YuLanMiniForCausalLM(config)
    m_width = 512 / 64
    expected_alphas = {"q_proj_alpha": m_width**-0.5, "k_proj_alpha": m_width**-0.5, "v_proj_alpha": m_width**-0.5,
                       "gate_up_proj_alpha": m_width**-0.5, "o_proj_alpha": (2 * m_width * 4) ** -0.5,
                       "down_proj_alpha": (2 * m_width * 4) ** -0.5, "input_layernorm_alpha": 1.0,
                       "post_attention_layernorm_alpha": 1.0, "norm_alpha": 1.0, "lm_head_alpha": 1.0}
    seen = set()
    for name, parameter in model.named_parameters():
        short = name.rsplit(".", 1)[-1]
        if short.endswith("_alpha"):
            assert torch.all(parameter == torch.tensor(expected_alphas[short])), name
            seen.add(short)
        elif short == "bias":
            assert torch.all(parameter == 0), name
        elif "norm" in name:
            assert torch.all(parameter == 1), name
        else:  # every matrix, the tied embedding included: N(0, 5e-5^2)
            assert parameter.std().item() == pytest.approx(5e-5, rel=0.02), name
            assert abs(parameter.mean().item()) < 5e-5 * 5 / math.sqrt(parameter.numel()), name
    assert seen == set(expected_alphas)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # the full-size config's init values, exactly the reference's (1.2)
    full = YuLanMiniConfig()
    assert [full.q_proj_alpha, full.o_proj_alpha, full.input_layernorm_alpha, full.initializer_range] == [
        1 / math.sqrt(7.5), 1 / math.sqrt(2 * 7.5 * 56), 1.0, 5e-5]


def test_packed_rows_attend_within_documents_only():
    model = small_model(seed=3)
    generator = torch.Generator().manual_seed(3)
    first, second = (torch.randint(0, SMALL["vocab_size"], (1, n), generator=generator) for n in (5, 7))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        separate = torch.cat([model(first).logits, model(second).logits], dim=1)
        packed_logits = model(packed, position_ids=position_ids).logits  # eval mode, use_cache on by default
        unmasked = model(packed).logits
        model.train()
        packed_in_training = model(packed, position_ids=position_ids).logits
    assert (packed_logits - separate).abs().max().item() <= 1e-5
    assert (packed_in_training - separate).abs().max().item() <= 1e-5
    assert (unmasked[:, 5:] - separate[:, 5:]).abs().max().item() > 1e-2  # without position_ids documents mix


def test_kv_cache_generation_and_inputs_embeds():
    model = small_model(seed=4)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(4))
    with_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 16) and torch.equal(with_cache, without_cache)
    with torch.no_grad():
        from_ids = model(prompt).logits
        from_embeddings = model(inputs_embeds=model.get_input_embeddings()(prompt)).logits
    assert torch.equal(from_ids, from_embeddings)


def test_gradient_checkpointing_every_k_layers_as_the_reference():
    model = small_model(seed=5, num_hidden_layers=4, gradient_checkpointing_step=2).train()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    # the reference recomputes layer i iff i % gradient_checkpointing_step != 0 (1.8)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [False, True, False, True]
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model.config.gradient_checkpointing_step = None
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_options_qk_layernorm_and_unsupported_ablations():
    model = small_model(seed=6, qk_layernorm=True)
    names = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_layernorm.norms.3.weight",
            "model.layers.0.self_attn.k_layernorm.norms.1.weight"} <= names  # the reference's key names
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
    with torch.no_grad():
        logits = model(ids).logits
        model.model.layers[0].self_attn.q_layernorm.norms[0].weight.mul_(3)  # the option is really in the forward
        assert not torch.allclose(model(ids).logits, logits)
    for option in ({"embedding_ln": True}, {"rms_type": "gemma"}, {"use_sliding_window": True}):
        with pytest.raises(NotImplementedError, match="ablations"):
            YuLanMiniForCausalLM(YuLanMiniConfig.for_shape(**SMALL, **option))


def test_config_round_trip_keeps_reference_fields(tmp_path):
    config = YuLanMiniConfig.for_shape(**SMALL, rope_theta=490000.0, some_future_reference_field=3)
    config.save_pretrained(tmp_path)
    loaded = YuLanMiniConfig.from_pretrained(tmp_path)
    for field in ("q_proj_alpha", "o_proj_alpha", "hidden_states_shrink", "scale_emb", "z_loss", "dim_model_base_lr",
                  "dim_model_base_attn", "tie_word_embeddings", "some_future_reference_field"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.rope_parameters["rope_theta"] == 490000.0
    assert loaded.hidden_states_shrink == pytest.approx(1.4 / math.sqrt(2))
    assert YuLanMiniConfig(hidden_states_shrink="muparam", num_hidden_layers=4).hidden_states_shrink == 0.5
