"""Issue 33: a model read a layer at a time (streaming.py) gives what the model loaded whole gives.

Equal means bit for bit here: the streamed layers are the same modules with the same tensors in the same dtype,
called with the same arguments (LayerRunner, LayerMajor), and the stages keep the per-batch order of operations.
Checked on every tiny architecture (Gemma 3 included), for each kind of source (a folder, sharded, a Hub cache,
a GGUF, an lpconvert export), and through the stages (score, heal, eval).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from builders import TINY, cli_export, save_sharded_safetensors
from test_hub_cache import to_hub_cache

from lpconvert.runner import LayerRunner
from lpconvert.sources import resolve_model
from lpconvert.streaming import KEEP, LayerMajor, streamed_model

SEQ = 16


def _ids(batches: int = 3, rows: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (rows, SEQ), generator=generator) for _ in range(batches)]


def _both(path):
    source = resolve_model(str(path))
    return source.load_model(dtype=torch.float32), streamed_model(source, torch.float32)


def test_forward_generation_and_layer_runner_equal_the_whole_model(tiny_model_dir):
    whole, streamed = _both(tiny_model_dir)
    ids = _ids(1)[0]
    with torch.inference_mode():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)
        kept = streamed.weight_cache.loaded
        assert len(kept) <= KEEP  # memory: at most KEEP modules hold weights, whatever the depth
        assert torch.equal(streamed.generate(ids[:1, :6], max_new_tokens=6, do_sample=False),
                           whole.generate(ids[:1, :6], max_new_tokens=6, do_sample=False))
        a, b = LayerRunner(whole, SEQ), LayerRunner(streamed, SEQ)
        assert torch.equal(a.logprobs(a.run(a.embed(ids), pairs=[1])), b.logprobs(b.run(b.embed(ids), pairs=[1])))


def test_layer_major_passes_read_each_layer_once(tiny_models):
    """Every batch through layer i before layer i+1: one read per layer, and the logits of model(ids)."""
    whole, streamed = _both(tiny_models["llama"])
    batches = _ids(3)
    with torch.inference_mode():
        runner = LayerMajor(streamed, batches)
        reads = streamed.weight_cache.reads  # the embedding, read for the capture
        finals = runner.run(runner.inputs)
        layers = streamed.config.num_hidden_layers
        assert streamed.weight_cache.reads - reads == layers
        for ids, x in zip(batches, finals, strict=True):
            assert torch.equal(runner.logits(x), whole(ids).logits)
        runner_b = LayerRunner(streamed, SEQ)
        before = streamed.weight_cache.reads
        runner_b.run_all([runner_b.embed(ids) for ids in batches], pairs=[2])
        assert streamed.weight_cache.reads - before == layers + 1  # and the embedding once


def test_every_kind_of_source_streams_equal(tiny_models, tmp_path, monkeypatch, smollm2_gguf_source):
    """Sharded safetensors, a Hub cache (shards linked into blobs/), a GGUF (dequantised) and an lpconvert export."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sharded = save_sharded_safetensors(tiny_models["llama"], tmp_path / "sharded", tokenizer=True)
    plain = tmp_path / "plain"
    shutil.copytree(sharded, plain)
    snapshot = to_hub_cache(plain, tmp_path / "hub", "org/tiny")
    export = cli_export(tiny_models["gemma3"], tmp_path / "lp-gemma3")
    ids = _ids(1)[0]
    for path in (sharded, snapshot, export):
        whole, streamed = _both(path)
        with torch.inference_mode():
            assert torch.equal(streamed(ids).logits, whole(ids).logits), path
    gguf = smollm2_gguf_source
    whole, streamed = gguf.load_model(dtype=torch.float32), streamed_model(gguf, torch.float32)
    with torch.inference_mode():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_score_heal_and_eval_equal_in_memory(tiny_models, tmp_path, arch):
    from lpconvert.evaluate import evaluate
    from lpconvert.formats import Plan, source_fingerprint
    from lpconvert.heal.stage import heal
    from lpconvert.score import compute_scores
    from lpconvert.settings import EvalSettings, HealSettings, ScoreSettings

    source = resolve_model(str(tiny_models[arch]))
    common = dict(calib="news", seq_len=32, device="cpu")
    scores = {load: compute_scores(source, ScoreSettings(tokens=256, loss_tokens=64, measure_loss=True, load=load,
                                                          **common)) for load in ("stream", "whole")}
    for key in ("layers", "pairs", "base"):
        assert scores["stream"][key] == scores["whole"][key], key
    plan = Plan(source=source_fingerprint(source.config, source.store), pairs=[1, 3])
    healed = {load: heal(source, plan, HealSettings(tokens=128, heldout_tokens=64, load=load, **common))
              for load in ("stream", "whole")}
    assert healed["stream"].tensors.keys() == healed["whole"].tensors.keys()
    for name, tensor in healed["stream"].tensors.items():
        assert torch.equal(tensor, healed["whole"].tensors[name]), name
    converted = resolve_model(str(cli_export(tiny_models[arch], tmp_path / "lp", pairs="1,3")))
    reports = {load: evaluate(source, converted, EvalSettings(text="news", tokens=128, seq_len=32, device="cpu",
                                                               new_tokens=4, load=load))
               for load in ("stream", "whole")}
    for key in ("perplexity_source", "perplexity_converted", "agreement", "kl_divergence"):
        assert reports["stream"][key] == pytest.approx(reports["whole"][key], rel=1e-6), key
    assert reports["stream"]["generation"] == reports["whole"]["generation"]


def test_plan_search_measures_equal_streamed(tiny_models, tmp_path):
    import json

    from builders import invoke, write_scores

    scores = write_scores(tmp_path / "scores.json", tiny_models["llama"])
    plans = {}
    for load in ("stream", "whole"):
        result = invoke("plan", scores, "--model", tiny_models["llama"], "--pairs", "2", "--strategy", "search",
                        "--calib", "news", "--tokens", "128", "--heldout-tokens", "64", "--seq-len", "32",
                        "--device", "cpu", "--load", load, "-o", tmp_path / f"{load}.json")
        assert result.exit_code == 0, result.output
        plans[load] = json.loads((tmp_path / f"{load}.json").read_text())
    for plan in plans.values():  # all but the clock
        plan["details"].pop("planning_seconds")
        plan["details"]["cost"].pop("seconds")
    assert plans["stream"] == plans["whole"]


def test_score_and_eval_print_their_memory_plan_before_work(tiny_models, tmp_path):
    from builders import invoke

    model = tiny_models["llama"]
    score = invoke("--progress", "lines", "score", model, "--calib", "news", "--tokens", "128", "--seq-len", "32",
                   "--device", "cpu", "-o", tmp_path / "scores.json")
    assert score.exit_code == 0, score.output
    assert score.stderr.index("memory: a layer at a time (") < score.stderr.index("reading the calibration text")
    converted = cli_export(model, tmp_path / "lp")
    evaluated = invoke("--progress", "lines", "eval", model, converted, "--text", "news", "--tokens", "64",
                       "--seq-len", "32", "--device", "cpu", "--load", "whole")
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stderr.index("memory: the whole models") < evaluated.stderr.index("evaluating both models")
