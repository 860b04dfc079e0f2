"""Gemma 3: pairs of layers with sandwich norms, local and global layers, and what other runtimes refuse.

The tiny Gemma 3 of builders.TINY_ARCHS (layers 0-4 local, 5 global) runs through every per-architecture test;
here an 8-layer one with two global layers side by side, so that a global pair exists too.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import invoke, make_tiny_model, make_tiny_tokenizer, write_scores
from reference import reference_logits
from transformers import AutoModelForCausalLM

from lpconvert.errors import LPError
from lpconvert.export import export, plan_for_pairs
from lpconvert.sources import resolve_model

# local local | global global | local local local | global: a local pair at block 0, a global pair, a local pair
LAYER_TYPES = ["sliding_attention"] * 2 + ["full_attention"] * 2 + ["sliding_attention"] * 3 + ["full_attention"]
PAIRS = [0, 2, 4]


@pytest.fixture(scope="module")
def gemma8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma8") / "src"
    make_tiny_model("gemma3", seed=7, num_hidden_layers=8, layer_types=LAYER_TYPES).save_pretrained(folder)
    make_tiny_tokenizer(128).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported8(gemma8, tmp_path_factory):
    source = resolve_model(str(gemma8))
    out = tmp_path_factory.mktemp("gemma8-lp") / "lp"
    export(source, plan_for_pairs(source, PAIRS, allow_edge_layers=True), out, dtype="float32")
    return out


def _ids(batch=2, seq=24, seed=0):  # 24 tokens: well past the sliding window of 4
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_local_and_global_pairs_match_the_two_branch_reference(gemma8, exported8):
    source = resolve_model(str(gemma8)).load_model()
    ids = _ids()
    with torch.no_grad():
        got = _load(exported8)(ids).logits
        sequential = source(ids).logits
    want = reference_logits(source, ids, PAIRS)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert (sequential - want).abs().max() > 1e-3  # the pairs change the model


def test_a_pair_keeps_its_branches_apart_until_its_post_norms(exported8):
    config = json.loads((exported8 / "config.json").read_text())
    assert config["lp_blocks"] == [[0, 1], [2, 3], [4, 5], [6], [7]]
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention",
                                     "sliding_attention", "full_attention"]
    assert config["sandwich_norms"] is True and config["norm_offset"] == 1.0
    assert config["embed_scale"] == pytest.approx(64 ** 0.5) and config["query_pre_attn_scalar"] == 12
    assert set(config["rope_parameters"]) == {"full_attention", "sliding_attention"}
    model = _load(exported8)
    pair, single = model.model.layers[0], model.model.layers[3]
    # [a | b] columns as any pair's; each branch's product kept apart (LPBranchLinear, a Linear PEFT can wrap)
    assert tuple(pair.self_attn.o_proj.weight.shape) == (64, 2 * 4 * 16)
    assert tuple(pair.mlp.down_proj.weight.shape) == (64, 2 * 96)
    assert type(pair.self_attn.o_proj).__name__ == "LPBranchLinear" and isinstance(pair.mlp.down_proj, torch.nn.Linear)
    assert tuple(pair.post_attention_layernorm.weight.shape) == (2, 64)
    assert torch.equal(pair.input_layernorm.weight, torch.zeros(64))  # folded: 1 + 0 = unit
    assert isinstance(single.self_attn.o_proj, torch.nn.Linear)


def test_cached_decoding_through_both_window_kinds_equals_full_forward(exported8):
    model = _load(exported8)
    prompt = _ids(batch=1, seq=3, seed=1)
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(20):
            tokens = torch.cat([tokens, model(tokens, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens)


def test_a_local_global_pair_is_refused_in_one_line(gemma8, tmp_path):
    source = resolve_model(str(gemma8))
    with pytest.raises(LPError, match=r"pair \(1, 2\) joins a local \(sliding-window\) and a global layer"):
        plan_for_pairs(source, [1])
    result = invoke("export", gemma8, "--pairs", "4,6", "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "pair (6, 7) joins a local" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_gguf_export_is_refused_in_one_line(tiny_models, tmp_path):
    for pairs in ("1", "none"):
        result = invoke("export", tiny_models["gemma3"], "--pairs", pairs, "-o", tmp_path / "m.gguf")
        assert result.exit_code == 2 and "sandwich norms" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_planner_never_joins_a_local_and_a_global_layer(tiny_models, tmp_path):
    """(4, 5) looks safest by far, but layer 5 is global: greedy and contiguous plans pass it by."""
    model = tiny_models["gemma3"]
    scores = write_scores(tmp_path / "scores.json", model, rel_l2=[0.9, 0.5, 0.6, 0.4, 0.01],
                          loss_increase=[5.0, 0.05, 0.06, 0.04, 0.001])
    assert json.loads(scores.read_text())["source"]["unpairable"] == [4]
    for strategy in ("greedy", "contiguous"):
        result = invoke("plan", scores, "--pairs", "2", "--strategy", strategy, "-o", tmp_path / f"{strategy}.json")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / f"{strategy}.json").read_text())["pairs"] == [[1, 2], [3, 4]]
    result = invoke("plan", scores, "--pairs", "3", "-o", tmp_path / "three.json")
    assert result.exit_code == 2 and "at most 2" in result.stderr and "local and global" in result.stderr


def test_distill_trains_sandwich_pairs_and_the_export_computes_what_it_measured(tiny_models, tmp_path):
    """distill (every projection, the pairs' branch projections included) lowers the held-out loss, and the
    healed export equals the runner with those weights, post-norms per branch."""
    from lpconvert.heal import heal
    from lpconvert.healfile import load_heal_file, write_heal_file
    from lpconvert.runner import LayerRunner
    from lpconvert.settings import HealSettings, build

    source = resolve_model(str(tiny_models["gemma3"]))
    plan = plan_for_pairs(source, [1, 3])
    settings = {"tokens": 1024, "heldout_tokens": 256, "seq_len": 64, "damping": [0.1, 1.0], "device": "cpu",
                "method": "distill", "steps": 6, "lr": 1e-3}
    result = heal(source, plan, build(HealSettings, settings))
    distill = result.report["distill"]
    assert distill["heldout_loss_after"] < distill["heldout_loss_before"]
    write_heal_file(tmp_path / "heal.safetensors", result.tensors, result.header)
    export(source, plan, tmp_path / "out", dtype="float32", heal=load_heal_file(tmp_path / "heal.safetensors"))
    ids = _ids()
    runner = LayerRunner(source.load_model(), seq_len=ids.shape[1])
    runner.corrections = result.corrections
    with torch.no_grad():
        expected = runner._head(runner.run(runner.embed(ids), pairs=[1, 3]))
        got = _load(tmp_path / "out")(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The real model (slow: Gemma-3-270M, assembled from its packages and converted once into the cache)

REAL_PAIRS = [6, 13, 15]  # 15 of 18 blocks: the three pairs of least single-pair loss that fit (docs/quality.md)


@pytest.mark.slow
def test_gemma3_270m_export_is_exact_and_answers(tmp_path):
    source = resolve_model("gemma3-270m")
    assert source.kind == "builtin" and source.config.model_type == "gemma3_text"
    export(source, plan_for_pairs(source, REAL_PAIRS), tmp_path / "lp", dtype="float32")
    model, tokenizer = _load(tmp_path / "lp"), source.load_tokenizer()
    assert model.config.num_hidden_layers == 15
    prompt = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(prompt).logits
    want = reference_logits(source.load_model(), prompt, REAL_PAIRS)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    answer = model.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:]
    assert tokenizer.decode(answer).strip().startswith("Berlin")


def test_tensor_parallelism_of_sandwich_pairs_is_refused_in_one_line(exported8, gemma8, tmp_path):
    """transformers' tp_plan="auto" (torchrun) gives a model with pairs no plan for their branch projections, which
    crashed at the first forward ("narrow unexpectedly changed concrete size"). Simulated here as transformers marks
    a model it distributed (config.distributed_config, the model's _tp_size): refused in one line, as vLLM is.
    Checked for real under torchrun (2 gloo processes) with the same message."""
    from types import SimpleNamespace

    model = _load(exported8)
    ids = _ids(batch=1, seq=6)
    model(ids)  # one process: runs
    for mark in ("config", "model"):
        if mark == "config":
            model.config.distributed_config = SimpleNamespace(tp_size=2)  # what maybe_distribute_model sets
        else:
            del model.config.distributed_config
            model._tp_size = 2
        with pytest.raises(ValueError) as refused:
            model(ids)
        assert "tensor parallelism (2 devices) cannot shard those branch projections" in str(refused.value)
        assert "\n" not in str(refused.value)
    source = resolve_model(str(gemma8))  # without pairs every projection has its plan: not refused
    export(source, plan_for_pairs(source, []), tmp_path / "copy")
    unpaired = _load(tmp_path / "copy")
    unpaired._tp_size = 2
    unpaired(ids)
