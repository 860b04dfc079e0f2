"""Issue 34: `AutoTokenizer.from_pretrained(EXPORT)`, without trust_remote_code, must not ask "Do you wish to run the
custom code? [y/N]" (a hang in CI) and must give the source's tokens, for every kind of source.

AutoTokenizer reads config.json first; an export's model_type is the source's, which transformers knows, so it
builds the source's config class from the export's config.json (which must not refuse it) and asks nothing. The
check runs in a subprocess with stdin closed, as a CI job would run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from builders import TINY_ARCHS, cli_export, make_tiny_model, save_byte_level_model

from lpconvert.sources import resolve_model

TEXT = "The news today: 42 people read it twice, and then again!"
QUESTION = "Do you wish to run the custom code"

# AutoTokenizer and AutoConfig exactly as a user calls them: no trust_remote_code, nothing else.
UNTRUSTED = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
config = AutoConfig.from_pretrained(sys.argv[1])
print(json.dumps({"class": type(tokenizer).__name__, "config": type(config).__name__,
                  "ids": tokenizer(sys.argv[2])["input_ids"]}))
"""

# A trusted load of the model, then save_pretrained (as after a fine-tune) with the export's tokenizer beside it.
TRUSTED_SAVE = """
import json, shutil, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_warning()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
model.save_pretrained(sys.argv[2])
for name in Path(sys.argv[1]).glob("tokenizer*"):
    shutil.copy(name, sys.argv[2])
print(json.dumps({"class": type(model).__name__, "model_type": model.config.model_type}))
"""


def _run(script: str, *args) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return json.loads(result.stdout.strip().splitlines()[-1]), output


def _untrusted_tokens(folder: Path) -> dict:
    """What AutoTokenizer gives for TEXT from FOLDER, in a subprocess that could not answer a question."""
    answer, output = _run(UNTRUSTED, folder, TEXT)
    assert QUESTION not in output and "trust_remote_code" not in output, output
    return answer


def _source_tokens(folder: Path, **kwargs) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return {"class": type(tokenizer).__name__, "ids": tokenizer(TEXT)["input_ids"]}


def _check_export(out: Path, source_model_type: str, want: dict) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == source_model_type and "per_layer_config" not in config
    assert config["architectures"] == ["LPForCausalLM"] and "AutoConfig" in config["auto_map"]
    got = _untrusted_tokens(out)
    assert (got["class"], got["ids"]) == (want["class"], want["ids"])
    assert got["config"] != "LPConfig"  # the source's own config class, built from the export's config.json
    assert resolve_model(str(out)).kind == "lpconvert"  # and lpconvert still knows its export


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_autotokenizer_reads_an_export_without_asking(arch, tiny_models, tmp_path):
    out = cli_export(tiny_models[arch], tmp_path / "out", pairs="2")
    source_type = json.loads((tiny_models[arch] / "config.json").read_text())["model_type"]
    _check_export(out, source_type, _source_tokens(tiny_models[arch]))


def save_tiny_gguf(folder: Path) -> Path:
    """A tiny random Llama as a float32 GGUF with a byte-level BPE tokenizer (what llama.cpp's converter writes
    for one; q and k are not permuted, which only the numbers would notice), in FOLDER/tiny.gguf."""
    import gguf
    from safetensors.torch import load_file

    from lpconvert.ggufvocab import check_vocabulary, write_vocabulary

    hf = save_byte_level_model(folder / "hf", "llama", tie_word_embeddings=False)
    config = json.loads((hf / "config.json").read_text())
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    source = SimpleNamespace(tokenizer_path=hf, name="tiny", gguf_file=None,
                             config=SimpleNamespace(vocab_size=config["vocab_size"]))
    write_vocabulary(writer, source, config["vocab_size"], check_vocabulary(source))
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in load_file(hf / "model.safetensors").items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            name_in_gguf = f"blk.{layer}.{parts[rest.removesuffix('.weight')]}"
        else:
            name_in_gguf = top[name]
        writer.add_tensor(f"{name_in_gguf}.weight", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shutil.rmtree(hf)
    return folder / "tiny.gguf"


def test_autotokenizer_reads_an_export_of_a_gguf_without_asking(tmp_path):
    """A GGUF carries its tokenizer inside; the export writes it out, and its config.json gets the model_type of
    the config transformers builds from the GGUF."""
    (tmp_path / "gguf").mkdir()
    gguf_file = save_tiny_gguf(tmp_path / "gguf")
    out = cli_export(gguf_file, tmp_path / "out", pairs="2")
    _check_export(out, "llama", _source_tokens(gguf_file.parent, gguf_file=gguf_file.name))


def save_sentencepiece_gemma3(folder: Path) -> Path:
    """The tiny Gemma 3 with a SentencePiece-style tokenizer as Gemma's tokenizer.json has it (BPE with byte
    fallback, spaces as "▁", GemmaTokenizer), in FOLDER."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    from lpconvert.texts import resolve_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator([resolve_text("news").text[:100_000]], trainer=trainer)
    wrapped = GemmaTokenizer(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                             pad_token="<pad>")
    make_tiny_model("gemma3", vocab_size=tokenizer.get_vocab_size(), pad_token_id=0, eos_token_id=1,
                    bos_token_id=2).save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


def test_autotokenizer_reads_a_gemma3_export_with_a_sentencepiece_tokenizer(tmp_path):
    source = save_sentencepiece_gemma3(tmp_path / "gemma3")
    out = cli_export(source, tmp_path / "out", pairs="2")
    want = _source_tokens(source)
    assert want["class"] == "GemmaTokenizer"
    _check_export(out, "gemma3_text", want)


def test_a_trusted_load_saves_a_config_autotokenizer_reads_without_asking(tiny_models, tmp_path):
    """A fine-tune loads the export with trust_remote_code and saves it again: the saved config.json keeps the
    source's model_type (and no per_layer_config), so AutoTokenizer still asks nothing. The loaded config's
    model_type is lpconvert's own, and transformers does not warn that the file's is another."""
    out = cli_export(tiny_models["gemma3"], tmp_path / "out", pairs="2")
    loaded, output = _run(TRUSTED_SAVE, out, tmp_path / "saved")
    assert loaded == {"class": "LPForCausalLM", "model_type": "lpconvert"}
    assert "to instantiate a model of type" not in output, output
    _check_export(tmp_path / "saved", "gemma3_text", _source_tokens(tiny_models["gemma3"]))


def test_an_older_export_is_still_read(tiny_models, tmp_path):
    """Exports written before this change: model_type "lpconvert" and the per-block widths in config.json. lpconvert
    reads them as before, and a config saved from one writes the source's model_type."""
    from lpconvert.modeling.configuration_lpconvert import LPConfig

    out = cli_export(tiny_models["qwen2"], tmp_path / "out", pairs="2")
    raw = json.loads((out / "config.json").read_text())
    raw.update(model_type="lpconvert", per_layer_config={
        "2": {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 192}})
    (out / "config.json").write_text(json.dumps(raw))
    source = resolve_model(str(out))
    assert source.kind == "lpconvert" and source.config.model_type == "lpconvert"
    assert source.config.is_heterogeneous and source.config.per_layer_config[2].num_key_value_heads == 4
    source.load_model()
    source.config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and "per_layer_config" not in saved
    assert LPConfig.from_pretrained(tmp_path / "saved").to_dict()["lp_blocks"] == raw["lp_blocks"]
