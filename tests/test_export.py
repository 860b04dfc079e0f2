"""Export: exactness against an independent reference, decoding with caches, the files written,
streaming and atomic writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import interrupt_while_writing, slow_export_script
from reference import reference_logits
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lpconvert.errors import LPError
from lpconvert.export import export, plan_for_pairs
from lpconvert.sources import resolve_model

PAIR_SETS = {"llama": [1, 3], "llama-bias": [2], "mistral": [1, 3], "qwen2": [1, 3], "qwen3": [2], "gemma3": [1, 3]}


def _load(folder: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def _export(tiny_dir: Path, out: Path, pairs: list[int], **kwargs):
    source = resolve_model(str(tiny_dir))
    return export(source, plan_for_pairs(source, pairs), out, **kwargs)


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Each tiny architecture exported with its pair set, once per module."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for arch, folder in tiny_models.items():
        folders[arch] = root / arch
        _export(folder, folders[arch], PAIR_SETS[arch], max_shard_size="100KB")
    return folders


def _ids(batch=2, seq=24, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(PAIR_SETS))
def test_empty_plan_equals_source(arch, tiny_models, tmp_path):
    _export(tiny_models[arch], tmp_path / "out", [])
    source = resolve_model(str(tiny_models[arch])).load_model()
    ids = _ids()
    with torch.no_grad():
        diff = (_load(tmp_path / "out")(ids).logits - source(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("arch", list(PAIR_SETS))
def test_pairs_match_two_branch_reference(arch, tiny_models, exported):
    source = resolve_model(str(tiny_models[arch])).load_model()
    ids = _ids()
    with torch.no_grad():
        got = _load(exported[arch])(ids).logits
    want = reference_logits(source, ids, PAIR_SETS[arch])
    relative = ((got - want).norm() / want.norm()).item()
    assert relative <= 1e-5
    # And the pairs really change the model: the reference is not the sequential model.
    with torch.no_grad():
        assert (source(ids).logits - want).abs().max() > 1e-3


def test_exported_config_and_blocks_widen_the_paired_layers(exported):
    config = json.loads((exported["qwen2"] / "config.json").read_text())
    assert config["lp_blocks"] == [[0], [1, 2], [3, 4], [5]]
    assert config["num_hidden_layers"] == 4
    assert config["architectures"] == ["LPForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["lp_source"]["model_type"] == "qwen2" and config["lp_source"]["num_hidden_layers"] == 6
    assert config["attention_bias"] is True and config["attention_out_bias"] is False
    model = _load(exported["qwen2"])
    wide = model.model.layers[1].self_attn
    assert wide.qkv_sizes == [8 * wide.head_dim, 4 * wide.head_dim, 4 * wide.head_dim]
    assert model.model.layers[1].mlp.down_proj.in_features == 2 * 96
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(64))


def test_each_block_declares_its_widths_as_a_per_layer_reader_finds_them(exported, tiny_models, tmp_path):
    """vLLM and tensor parallelism size each block from per_layer_config (transformers 5.14 and later): the
    pair blocks declare two layers' heads and MLP width, the others none, and no global read is ambiguous. The
    config derives them from lp_blocks: config.json does not carry them (the source's config class refuses them)."""
    from transformers import AutoConfig

    assert "per_layer_config" not in json.loads((exported["qwen2"] / "config.json").read_text())
    config = AutoConfig.from_pretrained(exported["qwen2"], trust_remote_code=True)
    assert config.is_heterogeneous
    widths = [(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) for c in config.per_layer_config]
    assert widths == [(4, 2, 96), (8, 4, 192), (8, 4, 192), (4, 2, 96)]
    _export(tiny_models["qwen2"], tmp_path / "copy", [])  # no pairs: every block as wide as the source's
    copy = AutoConfig.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert not copy.is_heterogeneous and copy.num_attention_heads == 4


def test_declared_widths_that_disagree_with_the_blocks_are_refused(exported, tmp_path):
    import shutil

    from lpconvert.sources import resolve_model as resolve

    shutil.copytree(exported["qwen2"], tmp_path / "edited")
    config_path = tmp_path / "edited" / "config.json"
    config = json.loads(config_path.read_text())
    # as an older export's config.json declared them, one of them edited
    config["per_layer_config"] = {str(i): {"num_attention_heads": 8, "num_key_value_heads": 2 if i == 1 else 4,
                                           "intermediate_size": 192} for i in (1, 2)}
    config_path.write_text(json.dumps(config))
    with pytest.raises(LPError, match="per_layer_config .* does not match lp_blocks"):
        resolve(str(tmp_path / "edited"))


def test_export_writes_config_code_card_plan_and_indexed_shards(exported, tiny_models):
    folder = exported["llama"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "configuration_lpconvert.py", "modeling_lpconvert.py",
            "README.md", "lpconvert-plan.json", "model.safetensors.index.json"} <= names
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s in names for s in shards)
    with safe_open(folder / shards[0], "pt") as f:
        assert f.metadata()["producer"] == "lpconvert"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" in card and "layer-parallel" in card
    plan = json.loads((folder / "lpconvert-plan.json").read_text())
    assert plan["pairs"] == [[1, 2], [3, 4]] and plan["schema_version"] == 1
    # The shipped modeling code is the same static file for every export.
    for other in exported.values():
        assert (other / "modeling_lpconvert.py").read_bytes() == (folder / "modeling_lpconvert.py").read_bytes()
    assert not any(n.startswith(".") for n in os.listdir(folder.parent)), "temporary folder left behind"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_config_derived_as_transformers_does(arch, tiny_models, tmp_path):
    """Without a generation_config.json, the export writes the one transformers derives from config.json."""
    import shutil

    from transformers import AutoConfig, GenerationConfig

    folder = tmp_path / "source"
    shutil.copytree(tiny_models[arch], folder)
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=3, eos_token_id=[4, 5], pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(config))
    _export(folder, tmp_path / "out", [1])
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    expected = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).to_diff_dict()
    assert written == expected and written["eos_token_id"] == [4, 5]


def test_tokenizer_class_pinned_and_no_transformers_needed_for_the_weights(tiny_models, tmp_path):
    """The export pins the tokenizer class its source resolves to; transformers answers in the background."""
    from transformers import AutoTokenizer

    _export(tiny_models["qwen2"], tmp_path / "out", [1])
    pinned = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert pinned == type(AutoTokenizer.from_pretrained(tiny_models["qwen2"])).__name__


def test_broken_tokenizer_stops_the_export_early(tiny_models, tmp_path):
    import shutil
    import time

    folder = tmp_path / "source"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    calls = []

    def slow_progress(done, total):  # each tensor takes 100 ms: the tokenizer check has time to fail
        calls.append(done)
        time.sleep(0.1)

    source = resolve_model(str(folder))
    total = len(source.store.infos())
    with pytest.raises(LPError, match="could not load the tokenizer"):
        export(source, plan_for_pairs(source, [1]), tmp_path / "out", progress=slow_progress)
    assert len(calls) < total / 2 and not (tmp_path / "out").exists()


def test_tied_embeddings_stay_tied(exported):
    weight_names = set(json.loads((exported["llama"] / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in weight_names
    model = _load(exported["llama"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gemma3"])
def test_cached_greedy_decoding_matches_full_forward(arch, exported):
    model = _load(exported[arch])
    model.generation_config.eos_token_id = None  # 32 tokens whatever they are (the tiny Gemma's eos is token 1)
    prompt = _ids(batch=1, seq=5, seed=1)
    generated = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(32):  # recompute every step with a full forward pass, no cache
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)
    static = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0,
                            cache_implementation="static")
    assert torch.equal(static, tokens)


def test_padded_batch_matches_single_sequences(exported):
    model = _load(exported["qwen3"])
    short, long = _ids(1, 6, seed=2), _ids(1, 10, seed=3)
    batch = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    batch[0, 4:], mask[0, 4:] = short[0], 1  # left padding
    batch[1], mask[1] = long[0], 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 10:], alone[0, 6:])


def test_hidden_states_and_loss_match_the_source(exported, tiny_models, tmp_path):
    _export(tiny_models["mistral"], tmp_path / "copy", [])
    model, source = _load(tmp_path / "copy"), resolve_model(str(tiny_models["mistral"])).load_model()
    ids = _ids()
    with torch.no_grad():
        mine, theirs = model(ids, labels=ids, output_hidden_states=True), source(ids, labels=ids)
    assert len(mine.hidden_states) == 7
    assert abs(mine.loss.item() - theirs.loss.item()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_static_forward_matches_eager(arch, exported):
    model = _load(exported[arch])
    prompt = _ids(batch=1, seq=6, seed=4)
    eager = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True, cache_implementation="static")
    model.forward = torch.compile(model.forward, fullgraph=True)
    compiled = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, cache_implementation="static")
    assert torch.equal(eager.sequences, compiled.sequences)
    for a, b in zip(eager.logits, compiled.logits, strict=False):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_loads_where_lpconvert_cannot_be_imported(arch, exported):
    script = f"""
import sys
sys.modules["lpconvert"] = None  # any import of lpconvert now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(exported[arch])!r}, trust_remote_code=True)
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
assert out.shape == (1, 7)
try:
    import lpconvert
except ImportError:
    print("standalone ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "standalone ok" in result.stdout


def test_bfloat16_export_stores_bf16_and_generates(tiny_models, tmp_path):
    report = _export(tiny_models["qwen2"], tmp_path / "bf16", [1], dtype="bfloat16")
    assert report.dtype == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in f.keys())
    model = _load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert model.generate(_ids(1, 4), max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 8)


def test_refuses_existing_output_and_overwrites_on_request(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LPError, match="already exists"):
        _export(tiny_models["llama"], out, [2])
    assert (out / "keep.txt").exists()
    # --overwrite never removes a folder lpconvert did not write
    with pytest.raises(LPError, match="not written by lpconvert"):
        _export(tiny_models["llama"], out, [2], overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    _export(tiny_models["llama"], out, [2], overwrite=True)  # an empty folder may be replaced
    first = json.loads((out / "config.json").read_text())
    _export(tiny_models["llama"], out, [1], overwrite=True)  # and so may an export
    assert json.loads((out / "config.json").read_text())["lp_blocks"] != first["lp_blocks"]


def test_failure_midway_leaves_nothing(tiny_models, tmp_path):
    source = resolve_model(str(tiny_models["llama"]))
    plan = plan_for_pairs(source, [2])
    real_read_rows = source.store.read_rows

    def failing_read_rows(name, start, stop):
        if name.startswith("model.layers.3."):
            raise OSError(5, "simulated read error")
        return real_read_rows(name, start, stop)

    source.store.read_rows = failing_read_rows
    with pytest.raises(OSError):
        export(source, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_nan_in_paired_weights_is_reported(tiny_models, tmp_path):
    source = resolve_model(str(tiny_models["llama"]))
    real_read_rows = source.store.read_rows

    def read_with_nan(name, start, stop):
        tensor = real_read_rows(name, start, stop)
        if name == "model.layers.3.mlp.up_proj.weight":
            tensor = tensor.clone()
            tensor[0, 0] = float("nan")
        return tensor

    source.store.read_rows = read_with_nan
    with pytest.raises(LPError, match=r"model.layers.3.mlp.up_proj.weight \(layer 3\) contains NaN"):
        export(source, plan_for_pairs(source, [2]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    (dict(drop="lm_head.weight"), "the checkpoint has no lm_head.weight and its embeddings are not tied"),
    (dict(num_hidden_layers=5), "config.json does not match the weights: num_hidden_layers is 5 but the checkpoint "
                                "holds a different number of layers"),
    (dict(num_key_value_heads=4), "config.json does not match the weights: model.layers.0.self_attn.k_proj.weight "
                                  "is (32, 64) but the config implies (64, 64)"),
])
def test_checks_from_the_table_refuse_before_writing(change, message, tiny_models, tmp_path):
    """The tensor names and shapes these checks use come from the architecture table (archs.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "source"
    shutil.copytree(tiny_models["qwen2"], folder)
    drop = change.pop("drop", None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    weights = load_file(folder / "model.safetensors")
    save_file({n: t for n, t in weights.items() if n != drop}, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(LPError) as raised:
        _export(folder, tmp_path / "out", [1])
    assert raised.value.problem == message
    assert not (tmp_path / "out").exists()


def test_small_chunks_give_the_same_checkpoint(tiny_models, tmp_path, monkeypatch):
    import lpconvert.blocks as blocks_module

    _export(tiny_models["qwen3"], tmp_path / "big", [1, 3], dtype="bfloat16")
    monkeypatch.setattr(blocks_module, "CHUNK_BYTES", 1000)  # many row blocks per tensor
    _export(tiny_models["qwen3"], tmp_path / "small", [1, 3], dtype="bfloat16")
    assert (tmp_path / "big" / "model.safetensors").read_bytes() == (tmp_path / "small" / "model.safetensors").read_bytes()


def test_dry_run_writes_nothing(tiny_models, tmp_path):
    report = _export(tiny_models["mistral"], tmp_path / "out", [1, 3], dry_run=True, max_shard_size="100KB")
    assert report.dry_run and len(report.shards) > 1 and report.effective_depth == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_pairs_match_reference(smollm2_dir, tmp_path):
    source = resolve_model(str(smollm2_dir))
    pairs = [10, 14, 20]
    export(source, plan_for_pairs(source, pairs), tmp_path / "lp")
    ids = _ids(batch=1, seq=48, seed=5) * 300  # spread over the 49k vocabulary
    with torch.no_grad():
        got = _load(tmp_path / "lp")(ids).logits
    want = reference_logits(source.load_model(), ids, pairs)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.slow
def test_smollm2_bfloat16_generates_coherent_text(tmp_path):
    source = resolve_model("smollm2-135m")
    export(source, plan_for_pairs(source, [12, 16]), tmp_path / "lp", dtype="bfloat16")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lp")
    model = _load(tmp_path / "lp", dtype=torch.bfloat16)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_in_memory_conversion_matches_reference_and_leaves_source_intact(arch):
    from builders import make_tiny_model

    from lpconvert.blocks import convert_in_memory

    model = make_tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp_model = convert_in_memory(model, [1, 3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = _ids()
    with torch.no_grad():
        got = lp_model(ids).logits
    want = reference_logits(model, ids, [1, 3])
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_fold_fast_path_equals_float32_fold(dtype):
    from lpconvert.blocks import fold_norm

    g = torch.Generator().manual_seed(0)
    matrix = (torch.randn(512, 256, generator=g) * torch.logspace(-4, 2, 256)[None, :]).to(dtype)
    norm = (3 * torch.randn(256, generator=g)).to(dtype)
    assert torch.equal(fold_norm(matrix, norm, dtype), (matrix.float() * norm.float()[None, :]).to(dtype))


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_interrupted_export_leaves_nothing(signal_name, tiny_models, tmp_path):
    out = tmp_path / "out"
    script = slow_export_script(tiny_models["llama"], f"export(source, plan, Path({str(out)!r}))")
    assert interrupt_while_writing(script, tmp_path, ".out.lpconvert-tmp-", signal_name) != 0
    assert list(tmp_path.iterdir()) == [], "an interrupted export left files behind"


def test_a_transformers_without_per_layer_widths_builds_the_same_model(exported, monkeypatch):
    """transformers before 5.14 keeps per_layer_config as a plain value: the widths then come from lp_blocks."""
    from lpconvert.modeling import configuration_lpconvert
    from lpconvert.modeling.configuration_lpconvert import LPConfig
    from lpconvert.modeling.modeling_lpconvert import LPForCausalLM

    declared = _load(exported["qwen3"])
    monkeypatch.setattr(configuration_lpconvert, "_HETEROGENEOUS", False)
    config = LPConfig.from_pretrained(exported["qwen3"])
    assert not getattr(config, "is_heterogeneous", False)
    derived = LPForCausalLM(config).eval()
    derived.load_state_dict(declared.state_dict())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(derived(ids).logits, declared(ids).logits)


# ----------------------------------------------------------------------------------------------
# A loaded export is its checkpoint: module names, state_dict and loading info (issue 32 items 4, 5, 15)


def _checkpoint_keys(folder: Path) -> set[str]:
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_loaded_export_takes_back_its_own_state_dict(arch, strict, exported):
    """transformers' Trainer resumes with load_state_dict(strict=False): every key of the model's own state_dict
    must land (none skipped with a log line), and the model compute what it computed before."""
    model = _load(exported[arch])
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # not views of the parameters
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(state) - tied == _checkpoint_keys(exported[arch])  # the checkpoint's names, nothing fused
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        for tensor in model.parameters():  # so that only load_state_dict can bring the values back
            tensor.zero_()
    result = model.load_state_dict(state, strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_the_modules_are_the_checkpoints_projections(exported):
    """What PEFT targets by name (q_proj, v_proj, gate_proj ...) is there after from_pretrained: nothing fused."""
    pair = _load(exported["qwen3"]).model.layers[1]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {name for name, _ in pair.self_attn.named_children()}
    assert {"gate_proj", "up_proj", "down_proj"} <= {name for name, _ in pair.mlp.named_children()}
    assert not pair.self_attn.fused and not hasattr(pair.self_attn, "qkv_proj")


def test_output_loading_info_returns_the_model_and_an_empty_report(exported):
    model, info = AutoModelForCausalLM.from_pretrained(exported["gemma3"], trust_remote_code=True,
                                                       output_loading_info=True)
    assert type(model).__name__ == "LPForCausalLM"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_an_export_of_the_earlier_fused_layout_still_loads(exported, tmp_path):
    """Exports written before the separate layout store qkv_proj and gate_up_proj and do not name their layout in
    config.json: they load fused, take back their own state_dict, and compute the same as the separate export."""
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(exported["qwen2"], old)
    tensors = {}
    for shard in sorted(old.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (old / "model.safetensors.index.json").unlink()
    for prefix in {name.rsplit(".self_attn.", 1)[0] for name in tensors if ".self_attn." in name}:
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"{prefix}.self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")]
            tensors[f"{prefix}.self_attn.qkv_proj.{kind}"] = torch.cat(parts)
        tensors[f"{prefix}.mlp.gate_up_proj.weight"] = torch.cat(
            [tensors.pop(f"{prefix}.mlp.gate_proj.weight"), tensors.pop(f"{prefix}.mlp.up_proj.weight")])
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    for key in ("lp_projections", "lp_head_chunks", "lp_files"):
        config.pop(key)
    (old / "config.json").write_text(json.dumps(config))
    model = resolve_model(str(old)).load_model()
    assert model.model.layers[1].self_attn.fused
    assert set(model.state_dict()) == set(tensors)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, _load(exported["qwen2"])(ids).logits, atol=1e-5)
        model.load_state_dict(model.state_dict(), strict=True)


def test_a_model_built_from_a_config_in_code_has_the_separate_layout():
    from lpconvert.modeling.configuration_lpconvert import LPConfig

    assert LPConfig().lp_projections == "separate"
    assert LPConfig(lpconvert_version="0.1.0").lp_projections == "fused"  # an early export's config.json


def test_lpconverts_loader_refuses_weights_its_config_does_not_describe(exported, tmp_path, monkeypatch):
    """Behind the up-front check (test_errors' export_config_* cases): loading itself refuses a missing or left-over
    weight rather than re-initialise or drop it."""
    import shutil

    import lpconvert.sources as sources

    shutil.copytree(exported["llama"], tmp_path / "edited")
    source = resolve_model(str(tmp_path / "edited"))
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    config["lp_projections"] = "fused"
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LPError, match=r"has no weight model\.layers\.\d\.(mlp\.gate_up_proj|self_attn\.qkv_proj)"):
        sources._load_export(source.path, torch.float32)


# ----------------------------------------------------------------------------------------------
# What an export ships, recorded (issue 32 item 9; the refusals are test_errors' export_* cases)


def test_config_records_the_digests_of_the_shipped_code_and_tokenizer(exported):
    import hashlib

    folder = exported["llama"]
    recorded = json.loads((folder / "config.json").read_text())["lp_files"]
    assert set(recorded) == {"configuration_lpconvert.py", "modeling_lpconvert.py", "tokenizer.json",
                             "tokenizer_config.json"}
    for name, digest in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_a_fine_tuned_export_saved_by_transformers_reads_back(exported, tmp_path):
    """save_pretrained of a loaded export (what a fine-tune ends with) keeps the code lpconvert wrote, and a
    tokenizer re-saved by transformers (its files rewritten) still counts as the export's tokenizer."""
    from transformers import AutoTokenizer

    model = _load(exported["llama"])
    model.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(exported["llama"]).save_pretrained(tmp_path / "tuned")
    reread = resolve_model(str(tmp_path / "tuned")).load_model()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reread(ids).logits, model(ids).logits)
