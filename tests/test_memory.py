"""The memory check (lpconvert/memory.py): parameters counted from config.json, what the machine has (cgroup v2,
v1, MemAvailable), and each stage refusing in one line before it loads a model that cannot fit."""

from __future__ import annotations

import json
import shutil

import pytest
from builders import TINY_ARCHS, invoke

from lpconvert import memory
from lpconvert.archs import read_source_config
from lpconvert.errors import LPError
from lpconvert.settings import EvalSettings, ScoreSettings
from lpconvert.sources import resolve_model

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096}


def test_parameters_of_llama2_7b_from_its_config():
    assert memory.config_parameters(read_source_config(LLAMA2_7B)) == 6_738_415_616  # the published count


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_the_config_count_is_the_checkpoints_count(tiny_models, arch):
    """Biases, q/k norms, sandwich norms and tied embeddings: the formula counts what the weights hold."""
    source = resolve_model(str(tiny_models[arch]))
    assert memory.config_parameters(source.config) == memory.stored_parameters(source)


def _fake(tmp_path, name, **files):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for file, text in files.items():
        (folder / file.replace("__", ".")).write_text(text)
    return folder


def test_cgroup_v2_limit_counts_inactive_file_cache_as_free(tmp_path, monkeypatch):
    _fake(tmp_path, "job", memory__max=str(8 * 2**30), memory__current=str(3 * 2**30),
          memory__stat=f"anon {2 * 2**30}\ninactive_file {2**30}\n")
    monkeypatch.setattr(memory, "_cgroup_paths", lambda controller: ["/job"] if controller == "" else [])
    assert memory.cgroup_available(tmp_path) == (6 * 2**30, 8 * 2**30)


def test_cgroup_v1_limit_and_no_limit(tmp_path, monkeypatch):
    _fake(tmp_path, "memory/job", memory__limit_in_bytes=str(4 * 2**30), memory__usage_in_bytes=str(2**30),
          memory__stat="total_inactive_file 0\n")
    monkeypatch.setattr(memory, "_cgroup_paths", lambda controller: ["/job"] if controller == "memory" else [])
    assert memory.cgroup_available(tmp_path) == (3 * 2**30, 4 * 2**30)
    (tmp_path / "memory/job/memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert memory.cgroup_available(tmp_path) is None
    _fake(tmp_path, "v2", memory__max="max")
    monkeypatch.setattr(memory, "_cgroup_paths", lambda controller: ["/v2"] if controller == "" else [])
    assert memory.cgroup_available(tmp_path) is None


def test_the_smaller_of_the_cgroup_and_meminfo_is_what_there_is(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert memory.meminfo_available(tmp_path / "meminfo") == 2 * 2**20
    monkeypatch.setattr(memory, "meminfo_available", lambda: 10 * 2**30)
    monkeypatch.setattr(memory, "cgroup_available", lambda: (4 * 2**30, 5 * 2**30))
    assert memory.available_memory("cpu") == (4 * 2**30, "available under this cgroup's 5.0 GiB limit")
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)
    assert memory.available_memory("cpu") == (10 * 2**30, "available (MemAvailable)")


def _machine_with(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device, spread=False: (int(gib * 2**30), "available (test)"))
    monkeypatch.setattr(memory, "_has_gpu", lambda: False)


def test_a_llama2_7b_shape_on_a_24_gib_machine(monkeypatch):
    """The issue's case: loaded whole, score's float32 cannot fit 24 GiB, bfloat16 can; eval holds two models.
    Streamed (the default, issue 33) both fit, and the plan says what is held."""
    from lpconvert.evaluate import check_eval_memory
    from lpconvert.score import check_score_memory

    _machine_with(monkeypatch, 22.0)
    source = type("Source", (), {"name": "Llama-2-7b-hf", "config": read_source_config(LLAMA2_7B)})()
    plan = check_score_memory(source, ScoreSettings(), "cpu")
    assert plan.startswith("memory: a layer at a time (0.8 GiB per layer, embedding 0.5 GiB, head 0.5 GiB in "
                           "float32; at most 1.5 GiB at once)"), plan
    assert check_eval_memory(source, None, EvalSettings(), "cpu").startswith("memory: a layer at a time")
    with pytest.raises(LPError) as refused:
        check_score_memory(source, ScoreSettings(load="whole"), "cpu")
    assert refused.value.one_line() == (
        "score would need about 29.4 GiB to hold Llama-2-7b-hf (6.74B parameters in float32: 25.1 GiB + 0.8 GiB "
        "working + 3.5 GiB margin), more than the 22.0 GiB available (test) (--dtype bfloat16 halves the weights; "
        "LPCONVERT_SKIP_MEMORY_CHECK=1 tries anyway)")
    check_score_memory(source, ScoreSettings(dtype="bfloat16", load="whole"), "cpu")  # 12.6 GiB + 0.7 + 2.3: fits
    with pytest.raises(LPError, match=r"eval would need about 30\.1 GiB to hold Llama-2-7b-hf and the converted "
                                      r"model \(2 x 6\.74B parameters in bfloat16"):
        check_eval_memory(source, None, EvalSettings(dtype="bfloat16", load="whole"), "cpu")


def test_a_streamed_stage_that_cannot_fit_is_refused_in_one_line(monkeypatch):
    """Issue 33: streamed, a 7B's score needs a layer or two and the streams of its windows; on a 2 GiB machine that
    does not fit, and the one line names what it holds and what lowers it."""
    from lpconvert.score import check_score_memory

    _machine_with(monkeypatch, 2.0)
    source = type("Source", (), {"name": "Llama-2-7b-hf", "config": read_source_config(LLAMA2_7B)})()
    with pytest.raises(LPError) as refused:
        check_score_memory(source, ScoreSettings(), "cpu")
    assert refused.value.one_line() == (
        "score would need about 4.1 GiB to run Llama-2-7b-hf a layer at a time (1.5 GiB of weights in float32 at once "
        "+ 1.5 GiB working + 1.2 GiB margin), more than the 2.0 GiB available (test) (--dtype bfloat16 "
        "halves the weights; fewer --tokens; LPCONVERT_SKIP_MEMORY_CHECK=1 tries anyway)")


def test_the_estimate_is_stated():
    found = memory.estimate(10**9, "bfloat16", copies=2, working=5)
    assert found.weights == 4 * 10**9 and found.working == 5
    assert found.margin == int(memory.MARGIN_FRACTION * found.weights) + memory.MARGIN_BYTES
    assert found.total == found.weights + found.working + found.margin


def test_score_refuses_before_loading_and_the_env_skips_the_check(tiny_models, tmp_path, monkeypatch):
    from lpconvert.sources import ModelSource

    _machine_with(monkeypatch, 0.001)
    real_load = ModelSource.load_model

    def must_not_load(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(ModelSource, "load_model", must_not_load)
    args = ["score", tiny_models["llama"], "-o", tmp_path / "scores.json", "--tokens", "128", "--seq-len", "64",
            "--calib", "news", "--device", "cpu"]
    refused = invoke(*args)
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.output
    assert "score would need about 1.0 GiB" in refused.stderr and "more than the 0.0 GiB available (test)" in \
        refused.stderr and "--dtype bfloat16 halves the weights" in refused.stderr
    assert not (tmp_path / "scores.json").exists()
    monkeypatch.setattr(ModelSource, "load_model", real_load)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert invoke(*args).exit_code == 0


def test_every_stage_that_loads_a_model_checks(tiny_models, tmp_path, monkeypatch):
    """plan --model, heal, eval and bench (the model and its baseline at once) refuse in one line, naming their own options; a recipe names its keys."""
    from builders import QUICK_RECIPE, cli_export, write_scores

    source = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], source)
    scores = write_scores(tmp_path / "scores.json", source)
    plan = tmp_path / "plan.json"
    assert invoke("plan", scores, "--pairs", "1", "--strategy", "greedy", "-o", plan).exit_code == 0
    converted = cli_export(source, tmp_path / "lp", pairs="2")
    _machine_with(monkeypatch, 0.001)
    runs = {
        "plan would need": ["plan", scores, "--model", source, "--pairs", "1", "-o", tmp_path / "p.json",
                            "--device", "cpu", "--calib", "news", "--tokens", "128", "--seq-len", "64"],
        "heal would need": ["heal", source, "--plan", plan, "-o", tmp_path / "h.safetensors", "--device", "cpu",
                            "--calib", "news", "--tokens", "128", "--heldout-tokens", "64", "--seq-len", "64"],
        "eval would need": ["eval", source, converted, "--device", "cpu", "--text", "news", "--tokens", "128",
                            "--seq-len", "64"],
    }
    for message, args in runs.items():
        result = invoke(*args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert message in result.stderr and "--dtype bfloat16 halves the weights" in result.stderr, result.stderr
    assert "fewer --tokens or --heldout-tokens; drop --model (plan from the scores alone)" in \
        invoke(*runs["plan would need"]).stderr
    assert "fewer --tokens or --heldout-tokens" in invoke(*runs["heal would need"]).stderr
    assert "and the converted model a layer at a time (" in invoke(*runs["eval would need"]).stderr
    assert "and the converted model (2 x " in invoke(*runs["eval would need"], "--load", "whole").stderr
    bench = invoke("bench", converted, "--baseline", source, "--device", "cpu", "--dtype", "float32", "--prompt-len",
                   "8", "--new-tokens", "4", "--warmup", "0", "--repeats", "1")
    assert bench.exit_code == 2 and "bench would need" in bench.stderr and "and its baseline (2 x " in bench.stderr
    assert "(--dtype bfloat16 halves the weights; drop --baseline (time the model alone);" in bench.stderr
    (tmp_path / "recipe.yaml").write_text(QUICK_RECIPE)
    recipe = invoke("convert", source, "-o", tmp_path / "out", "--recipe", tmp_path / "recipe.yaml")
    assert recipe.exit_code == 2 and "(score.dtype: bfloat16 halves the weights" in recipe.stderr, recipe.output
    assert not (tmp_path / "out").exists()


def test_a_config_claiming_70b_is_refused_from_the_config_alone(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000)
    (folder / "config.json").write_text(json.dumps(config))
    assert memory.parameters_of(resolve_model(str(folder))) == 68_714_504_192


def test_a_parents_tighter_limit_counts(tmp_path, monkeypatch):
    _fake(tmp_path, "outer", memory__max=str(2 * 2**30), memory__current=str(2**30))
    _fake(tmp_path, "outer/job", memory__max="max", memory__current=str(2**29))
    monkeypatch.setattr(memory, "_cgroup_paths", lambda controller: ["/outer/job"] if controller == "" else [])
    assert memory.cgroup_available(tmp_path) == (2**30, 2 * 2**30)


def test_on_a_gpu_its_free_memory_is_what_there_is(monkeypatch):
    import torch

    asked = []

    def mem_get_info(index):
        asked.append(index)
        return 5 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert memory.available_memory("cuda") == (5 * 2**30, "free on cuda")
    assert memory.available_memory("cuda:1") == (5 * 2**30, "free on cuda:1") and asked == [0, 1]
    assert memory.available_memory("mps") is None  # unified memory: no figure to refuse on
