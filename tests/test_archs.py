"""The architecture tables match real transformers models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers
from builders import TINY_ARCHS, make_tiny_model

from lpconvert.archs import ARCHITECTURES, LAYER_PREFIX, architecture_for, unsupported_reason
from lpconvert.errors import LPError


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_table_names_every_layer_tensor_of_the_real_model(name):
    model = make_tiny_model(name)
    arch = architecture_for(model.config)
    in_model = {k.removeprefix(LAYER_PREFIX.format(0)) for k in model.state_dict() if k.startswith(LAYER_PREFIX.format(0))}
    assert set(arch.layer_tensor_names(model.config)) == in_model


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_flags_match_the_modules_of_the_real_model(name):
    model = make_tiny_model(name)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    flags = architecture_for(model.config).flags(model.config)
    assert flags["attention_bias"] == (attn.q_proj.bias is not None)
    assert flags["attention_out_bias"] == (attn.o_proj.bias is not None)
    assert flags["mlp_bias"] == (mlp.down_proj.bias is not None)
    assert flags["qk_norm"] == hasattr(attn, "q_norm")


def test_every_table_names_a_real_transformers_class():
    for arch in ARCHITECTURES.values():
        assert hasattr(transformers, arch.hf_class)


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    reason = unsupported_reason(config)
    assert "gpt2" in reason and "Llama" in reason and "Qwen3" in reason
    with pytest.raises(LPError, match="not supported"):
        architecture_for(config)


def test_missing_config_fields_are_named():
    config = SimpleNamespace(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=10, rms_norm_eps=1e-6)
    assert "intermediate_size" in unsupported_reason(config)


# ----------------------------------------------------------------------------------------------
# config.json read without transformers (archs.read_source_config) against transformers' classes

# 32 heads: every architecture's default num_key_value_heads (8 or 32) divides it, as in a real model (LPConfig
# refuses one that does not)
_MINIMAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=32, vocab_size=128)
_RAW_CONFIGS = {
    **{f"{t}-minimal": dict(_MINIMAL, model_type=t) for t in ARCHITECTURES},
    **{f"{t}-nothing-but-type": dict(model_type=t) for t in ARCHITECTURES},
    "llama-legacy-rope": dict(_MINIMAL, model_type="llama", rope_theta=500000.0, torch_dtype="bfloat16",
                              rope_scaling={"type": "linear", "factor": 4.0}),
    "llama3-rope": dict(_MINIMAL, model_type="llama", num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-no-window": dict(_MINIMAL, model_type="mistral", sliding_window=None),
    "qwen2-sliding": dict(_MINIMAL, model_type="qwen2", use_sliding_window=True, sliding_window=8,
                          max_window_layers=3, tie_word_embeddings=True),
    "qwen2-window-off": dict(_MINIMAL, model_type="qwen2", sliding_window=8, head_dim=16),
    "qwen3-layer-types": dict(_MINIMAL, model_type="qwen3", head_dim=16, use_sliding_window=True,
                              sliding_window=8, layer_types=["sliding_attention"] * 2 + ["full_attention"] * 4),
}


def _both_configs(raw: dict, tmp_path):
    import json

    from lpconvert.archs import read_source_config

    (tmp_path / "config.json").write_text(json.dumps(raw))
    return read_source_config(raw), transformers.AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(_RAW_CONFIGS))
def test_config_read_without_transformers_exports_what_transformers_would(name, tmp_path):
    import inspect

    import torch

    from lpconvert.archs import PER_BLOCK_WIDTHS, one_layer_value
    from lpconvert.card import lp_config_dict
    from lpconvert.formats import Plan, fingerprint
    from lpconvert.modeling.configuration_lpconvert import LPConfig

    light, hf = _both_configs(_RAW_CONFIGS[name], tmp_path)
    arch = architecture_for(hf)
    assert architecture_for(light) is arch
    shapes = {"model.embed_tokens.weight": (hf.vocab_size, hf.hidden_size)}
    assert fingerprint(light, shapes) == fingerprint(hf, shapes)  # plans made before stay valid
    plan = Plan(source=fingerprint(hf, shapes), pairs=[0])  # layers of one attention type in every config
    exported = lp_config_dict(arch, light, plan, torch.bfloat16, "m")
    reference = lp_config_dict(arch, hf, plan, torch.bfloat16, "m")
    for key, value in exported.items():
        assert reference.get(key) == value, key
    # What the export leaves out, LPConfig fills with the value transformers wrote.
    built, expected = LPConfig.from_dict(exported), LPConfig.from_dict(reference)
    for key in [*inspect.signature(LPConfig.__init__).parameters, *reference]:
        if key in PER_BLOCK_WIDTHS:  # declared per block: a global read is ambiguous to transformers
            assert one_layer_value(built, key) == one_layer_value(expected, key), key
        elif key not in ("self", "kwargs", "transformers_version", "per_layer_config"):
            assert getattr(built, key, None) == getattr(expected, key, None), key
    assert [c.to_dict() for c in built.per_layer_config] == [c.to_dict() for c in expected.per_layer_config]


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_config_read_without_transformers_matches_saved_models(name, tiny_models):
    import json

    from lpconvert.archs import read_source_config
    from lpconvert.formats import _FINGERPRINT_FIELDS

    raw = json.loads((tiny_models[name] / "config.json").read_text())
    light, hf = read_source_config(raw), transformers.AutoConfig.from_pretrained(tiny_models[name])
    for key in (*_FINGERPRINT_FIELDS, "rms_norm_eps", "hidden_act", "sliding_window", "layer_types",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(light, key, None) == getattr(hf, key, None), key


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("hidden_size", "64"), ("vocab_size", True),
                                          ("max_window_layers", -1), ("rms_norm_eps", "1e-6")])
def test_config_values_transformers_would_refuse_are_named(field, value):
    from lpconvert.archs import read_source_config

    raw = dict(_MINIMAL, model_type="qwen2", **{field: value})
    with pytest.raises(LPError, match=f"config.json: {field} is"):
        read_source_config(raw)


# ----------------------------------------------------------------------------------------------
# Every tensor name and shape of a checkpoint is table data (archs.Architecture)


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_table_names_every_tensor_of_the_real_model(name):
    model = make_tiny_model(name)
    arch = architecture_for(model.config)
    layers = {arch.layer_prefix.format(i) + part for i in range(model.config.num_hidden_layers)
              for part in arch.layer_tensor_names(model.config)}
    outer = {w.name for w in (*arch.pre_weights, *arch.post_weights)}
    assert layers | outer == set(model.state_dict())
    tied = [w for w in arch.post_weights if w.tied_to]
    assert [w.tied_to in outer for w in tied] == [True]


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_table_shapes_are_the_real_model_shapes(name):
    model = make_tiny_model(name)
    state = model.state_dict()
    expected = architecture_for(model.config).expected_shapes(model.config)
    assert len(expected) == 4 and {k: tuple(state[k].shape) for k in expected} == expected


def test_shape_sizes_fall_back_as_the_layers_do():
    from lpconvert.archs import config_size

    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=None, head_dim=0)
    assert config_size(config, "num_key_value_heads * head_dim") == 64  # 4 heads of 64 // 4
    assert config_size(SimpleNamespace(num_key_value_heads=2, head_dim=16), "num_key_value_heads * head_dim") == 32
    assert config_size(config, "hidden_size // num_attention_heads") == 16


def test_every_rule_kind_has_a_builder():
    from lpconvert.blocks import KINDS

    assert {rule.kind for arch in ARCHITECTURES.values() for rule in arch.rules} <= set(KINDS)
