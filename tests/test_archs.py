"""The architecture tables match real transformers models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers
from conftest import TINY_ARCHS, make_tiny_model

from lpconvert.archs import ARCHITECTURES, LAYER_PREFIX, architecture_for, unsupported_reason
from lpconvert.errors import LPError


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_table_names_every_layer_tensor_of_the_real_model(name):
    model = make_tiny_model(name)
    arch = architecture_for(model.config)
    in_model = {k.removeprefix(LAYER_PREFIX.format(0)) for k in model.state_dict() if k.startswith(LAYER_PREFIX.format(0))}
    assert set(arch.layer_tensor_names(model.config)) == in_model


@pytest.mark.parametrize("name", list(TINY_ARCHS))
def test_flags_match_the_modules(name):
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
