"""Models in the Hugging Face Hub cache: sharded checkpoints whose files are symlinks into blobs/.

huggingface_hub lays a repo out as <cache>/models--org--name/{refs/main, snapshots/<rev>/<file>,
blobs/<sha>}, every snapshot file a relative link ../../blobs/<sha>. The folders here are built
that way by hand (the tests run offline), from tiny checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from builders import cli_export, make_tiny_model, save_sharded_bin, save_sharded_safetensors
from safetensors.torch import load_file

from lpconvert import sources
from lpconvert.errors import LPError
from lpconvert.hub import hub_cache_dir
from lpconvert.sources import resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def to_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Lay FOLDER out in CACHE as huggingface_hub would after downloading REPO_ID; return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)  # no newline: huggingface_hub reads the file as it is
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / REV
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_models):
    """A sharded tiny Llama as a plain folder and as org/tiny in a Hub cache named by HF_HUB_CACHE."""
    plain = save_sharded_safetensors(tiny_models["llama"], tmp_path / "plain", tokenizer=True)
    cache = tmp_path / "hub"
    snapshot = to_hub_cache(plain, cache, "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return plain, snapshot


def test_snapshot_files_are_links_into_blobs(hub_cache):
    _, snapshot = hub_cache
    for file in snapshot.iterdir():
        assert file.is_symlink() and os.readlink(file).startswith("../../blobs/")


def test_sharded_model_in_the_cache_is_read_by_id_and_by_path(hub_cache):
    plain, snapshot = hub_cache
    reference = resolve_model(str(plain))
    by_id = resolve_model("org/tiny")
    by_path = resolve_model(str(snapshot))
    assert (by_id.kind, by_path.kind) == ("hub", "folder")
    assert by_id.path == by_path.path == snapshot  # the links are opened, never resolved into blobs/
    assert by_id.hub_id == by_path.hub_id == "org/tiny" and reference.hub_id is None
    for source in (by_id, by_path):
        assert source.store.infos() == reference.store.infos()
        assert source.weight_files == sorted(snapshot.glob("model-*.safetensors"))
        assert source.disk_bytes() == reference.disk_bytes()  # sizes of the blobs, not of the links
        for name in reference.store.infos():
            assert torch.equal(source.store.read(name), reference.store.read(name)), name


def test_export_from_the_cache_equals_export_from_the_folder(hub_cache, tmp_path):
    plain, snapshot = hub_cache
    models = (str(plain), "org/tiny", str(snapshot))
    outs = [cli_export(model, tmp_path / f"out{i}") for i, model in enumerate(models)]
    names = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert names
    want = {name: load_file(outs[0] / name) for name in names}
    configs = []
    for out in outs:
        assert sorted(p.name for p in out.glob("*.safetensors")) == names
        for name in names:
            got = load_file(out / name)
            assert got.keys() == want[name].keys()
            assert all(torch.equal(got[k], want[name][k]) for k in got), (out, name)
        config = json.loads((out / "config.json").read_text())
        config["lp_source"].pop("name")
        configs.append(config)
    assert configs[0] == configs[1] == configs[2]
    cards = [(out / "README.md").read_text() for out in outs]
    assert f'base_model: {json.dumps(str(plain))}' in cards[0]  # a plain folder has no Hub id
    assert 'base_model: "org/tiny"' in cards[1] and 'base_model: "org/tiny"' in cards[2]


def test_exported_tokenizer_loads_without_remote_code(hub_cache, tmp_path):
    """The card's second way to load the tokenizer reads no config.json, so nothing asks [y/N]."""
    import re

    import transformers

    out = cli_export("org/tiny", tmp_path / "out")
    named = re.search(r"transformers\.(\w+)\.from_pretrained", (out / "README.md").read_text()).group(1)
    tokenizer = getattr(transformers, named).from_pretrained(out)
    source = transformers.AutoTokenizer.from_pretrained(hub_cache[0])
    assert tokenizer.get_vocab() == source.get_vocab() and type(tokenizer) is type(source)


def test_index_names_climbing_out_are_still_refused(hub_cache):
    """Following the cache's own links must not let the index name the blobs (or anything) itself."""
    _, snapshot = hub_cache
    index_link = snapshot / "model.safetensors.index.json"
    index = json.loads(index_link.read_text())
    blob = os.readlink(next(snapshot.glob("model-*.safetensors")))  # ../../blobs/<sha>: it exists
    index_link.unlink()
    for bad in (blob, str(snapshot / "model-00001-of-00002.safetensors"), "C:\\model.safetensors", ""):
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = bad
        index_link.write_text(json.dumps(index))
        with pytest.raises(LPError, match="outside the model folder"):
            resolve_model(str(snapshot))


def test_sharded_bin_model_in_the_cache_is_read_by_path_and_by_id(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    state = save_sharded_bin(make_tiny_model("llama", seed=1), folder)
    cache = tmp_path / "hub"
    snapshot = to_hub_cache(folder, cache, "org/tiny-bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for model in (str(snapshot), "org/tiny-bin"):
        source = resolve_model(model)
        assert source.store.infos() and set(source.store.infos()) == set(state)
        assert all(torch.equal(source.store.read(n), t) for n, t in state.items())
        assert source.hub_id == "org/tiny-bin"


def test_the_cache_and_offline_mode_are_read_when_called(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(kwargs)
        raise OSError("stop")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, offline in (("1", True), ("0", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(LPError, match="could not be fetched"):
            sources._hub_download("org/none", None)
        assert calls[-1]["local_files_only"] is offline
        assert calls[-1]["cache_dir"] == tmp_path / "elsewhere"


def test_model_id_is_found_under_hf_home(tmp_path, monkeypatch, tiny_models):
    snapshot = to_hub_cache(tiny_models["qwen2"], tmp_path / "hf" / "hub", "someone/qwen2-tiny")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = resolve_model("someone/qwen2-tiny")
    assert source.path == snapshot and source.hub_id == "someone/qwen2-tiny"


def test_link_whose_blob_is_gone_is_named_a_broken_symlink(tmp_path, tiny_models):
    snapshot = to_hub_cache(tiny_models["llama"], tmp_path / "hub", "org/tiny")
    (snapshot / os.readlink(snapshot / "model.safetensors")).unlink()  # a cache cleaned by hand
    with pytest.raises(LPError, match="model.safetensors is a broken symlink") as info:
        resolve_model(str(snapshot))
    assert info.value.fix == "re-download the checkpoint"
