"""What `lpconvert inspect` reports (lpconvert.describe)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from builders import TINY, make_tiny_model, save_bin_folder, save_lp_model, save_tiny_gpt2
from rich.console import Console

from lpconvert import archs, sources
from lpconvert.describe import describe_model
from lpconvert.render import description_table as render_description
from lpconvert.render import format_bytes, format_count
from lpconvert.sources import resolve_model

SHAPE_FIELDS = ("architecture", "model_type", "num_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
                "supported", "unsupported_reason", "dtype", "parameters")
SMOLLM2_SHAPES = dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def rendered(info: dict) -> str:
    console = Console(record=True, width=200)
    console.print(render_description(info))
    return console.export_text()


def test_every_tiny_architecture_is_described_as_transformers_builds_it(tiny_model_dir: Path):
    arch = tiny_model_dir.name
    source = resolve_model(str(tiny_model_dir))
    info = describe_model(source)
    json.dumps(info)  # JSON-serialisable
    model = make_tiny_model(arch)
    assert info["name"] == str(tiny_model_dir) and info["kind"] == "folder"
    assert info["path"] == str(tiny_model_dir)
    assert info["architecture"] == type(model).__name__
    assert info["model_type"] == model.config.model_type
    assert info["supported"] is True and info["unsupported_reason"] is None
    assert {k: info[k] for k in SMOLLM2_SHAPES} == dict(
        num_layers=TINY["num_hidden_layers"], hidden_size=TINY["hidden_size"],
        num_attention_heads=TINY["num_attention_heads"], num_key_value_heads=TINY["num_key_value_heads"],
        head_dim=TINY["head_dim"], intermediate_size=TINY["intermediate_size"], vocab_size=TINY["vocab_size"],
        tie_word_embeddings=model.config.tie_word_embeddings)
    assert info["dtype"] == "float32"
    assert info["parameters"] == model.num_parameters()  # a tied lm_head counted once
    assert info["disk_bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert "lp_blocks" not in info
    text = rendered(info)
    assert "supported" in text and "yes" in text


def test_bfloat16_and_tied_bin_checkpoints_count_each_parameter_once(tmp_path):
    model = make_tiny_model("llama").to(torch.bfloat16)  # tie_word_embeddings=True
    model.save_pretrained(tmp_path / "bf16")
    info = describe_model(resolve_model(str(tmp_path / "bf16")))
    assert info["dtype"] == "bfloat16"
    assert info["parameters"] == model.num_parameters()

    folder = save_bin_folder(tmp_path / "bin", model)  # a .bin holds the tied lm_head too: still counted once
    info = describe_model(resolve_model(str(folder)))
    assert info["parameters"] == model.num_parameters()
    assert info["dtype"] == "bfloat16"


def test_unsupported_architecture_is_described(tmp_path):
    save_tiny_gpt2(tmp_path, num_layers=2)
    info = describe_model(resolve_model(str(tmp_path)))
    assert info["supported"] is False
    assert info["architecture"] == "GPT2LMHeadModel" and info["model_type"] == "gpt2"
    assert "gpt2" in info["unsupported_reason"] and archs.SUPPORTED in info["unsupported_reason"]
    assert (info["num_layers"], info["hidden_size"], info["num_attention_heads"], info["head_dim"]) == (2, 32, 2, 16)
    json.dumps(info)
    text = rendered(info)
    assert "no — architecture 'gpt2' is not supported" in text


def test_lpconvert_export_reports_its_blocks(tmp_path):
    save_lp_model(tmp_path, [[0], [1, 2], [3, 4]])
    info = describe_model(resolve_model(str(tmp_path)))
    assert info["kind"] == "lpconvert" and info["model_type"] == "lpconvert"
    assert info["lp_blocks"] == [[0], [1, 2], [3, 4]]
    assert info["num_layers"] == 5 and info["effective_depth"] == 3
    assert info["supported"] is False and "already a layer-parallel checkpoint" in info["unsupported_reason"]
    json.dumps(info)
    text = rendered(info)
    assert "3 blocks (2 layer-parallel pairs)" in text and "0 1+2 3+4" in text


def test_counts_and_byte_sizes_are_shown_with_one_decimal_and_a_unit():
    assert format_count(134_515_008) == "134.5M"
    assert format_count(7_241_732_096) == "7.2B"
    assert format_count(12_345) == "12.3K"
    assert format_count(999) == "999"
    assert format_bytes(538_090_408) == "538.1 MB"
    assert format_bytes(14_483_464_192) == "14.5 GB"
    assert format_bytes(512) == "512 B"


def test_smollm2_is_described_alike_from_every_source(smollm2_dir: Path, smollm2_gguf_source):
    gguf = sources.smollm2_gguf()
    infos = {
        "builtin": describe_model(resolve_model("smollm2-135m")),
        "cache folder": describe_model(resolve_model(str(smollm2_dir))),
        "gguf file": describe_model(smollm2_gguf_source),  # resolve_model(str(gguf)), loaded once per session
    }
    for where, info in infos.items():
        assert {k: info[k] for k in SMOLLM2_SHAPES} == SMOLLM2_SHAPES, where
        json.dumps(info)
    reference = {k: infos["builtin"][k] for k in SHAPE_FIELDS}
    for where, info in infos.items():
        assert {k: info[k] for k in SHAPE_FIELDS} == reference, where
    assert reference["architecture"] == "LlamaForCausalLM" and reference["supported"] is True
    assert reference["dtype"] == "float32"
    assert format_count(reference["parameters"]) == "134.5M"
    assert [infos[w]["kind"] for w in infos] == ["builtin", "folder", "gguf"]
    assert infos["gguf file"]["disk_bytes"] == gguf.stat().st_size
    assert infos["builtin"]["disk_bytes"] == (smollm2_dir / "model.safetensors").stat().st_size
    text = rendered(infos["builtin"])
    assert "134.5M" in text and "538.1 MB" in text and "LlamaForCausalLM" in text


def test_config_lacking_fields_is_unsupported_not_a_crash(tiny_models):
    source = resolve_model(str(tiny_models["llama"]))
    source = dataclasses.replace(source, config=SimpleNamespace(model_type="llama", hidden_size=64,
                                                                num_attention_heads=4))
    info = describe_model(source)
    assert info["supported"] is False and "intermediate_size" in info["unsupported_reason"]
    assert info["architecture"] == "llama" and info["head_dim"] == 16 and info["num_key_value_heads"] == 4
    assert info["intermediate_size"] is None
    json.dumps(info)
    assert "—" in rendered(info)
