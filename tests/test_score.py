"""Score: metrics are finite and reproducible, the pair error sees identity layers, and the measured
loss of a pair equals the loss of the model exported with that pair. Bad score input is in test_errors.CASES."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lpconvert.cli import app
from lpconvert.errors import LPError
from lpconvert.export import export, plan_for_pairs
from lpconvert.formats import load_scores
from lpconvert.score import ScoreSettings, compute_scores, spearman
from lpconvert.sources import resolve_model
from lpconvert.texts import resolve_text, tokenize_windows

SETTINGS = dict(calib="news", tokens=512, seq_len=64, batch_size=4, device="cpu")


def _scores(folder, **overrides):
    return compute_scores(resolve_model(str(folder)), ScoreSettings(**{**SETTINGS, **overrides}))


def test_metrics_finite_and_deterministic(tiny_models):
    first, second = _scores(tiny_models["qwen3"]), _scores(tiny_models["qwen3"])
    rows = first["layers"] + first["pairs"]
    assert all(math.isfinite(v) for row in rows for v in row.values())
    assert first["layers"] == second["layers"] and first["pairs"] == second["pairs"]
    assert len(first["layers"]) == 6 and len(first["pairs"]) == 5
    other_seed = _scores(tiny_models["qwen3"], seed=1)
    assert other_seed["pairs"] != first["pairs"]
    assert first["calibration"]["tokens"] == 512 and first["calibration"]["source"] == "news"


def test_pair_error_is_zero_next_to_an_identity_layer(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():  # layer 3 becomes an identity: its attention and MLP add nothing
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    model.save_pretrained(tmp_path / "identity")
    resolve_model(str(tiny_models["llama"])).load_tokenizer().save_pretrained(tmp_path / "identity")
    pairs = _scores(tmp_path / "identity")["pairs"]
    assert pairs[2]["pair_rel_l2"] < 1e-5 and pairs[3]["pair_rel_l2"] < 1e-5
    assert all(p["pair_rel_l2"] > 1e-2 for p in pairs if p["first"] not in (2, 3))


def test_measured_loss_equals_loss_of_exported_pair(tiny_models, tmp_path):
    scores = _scores(tiny_models["mistral"], measure_loss=True, loss_tokens=256)
    source = resolve_model(str(tiny_models["mistral"]))
    windows = tokenize_windows(source.load_tokenizer(), resolve_text("news"), seq_len=64, num_tokens=512, seed=0)
    ids = windows.input_ids[:4]  # the loss budget: the first 256 tokens of the calibration windows
    export(source, plan_for_pairs(source, [2]), tmp_path / "lp")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lp", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        loss = exported(ids, labels=ids).loss.item()
    assert abs(scores["pairs"][2]["loss"] - loss) < 1e-5
    assert scores["loss_calibration"]["tokens"] == 256
    base = source.load_model()(ids, labels=ids).loss.item()
    assert abs(scores["base"]["loss_subset"] - base) < 1e-5
    assert set(scores["agreement_with_loss"]) == {"pair_rel_l2", "pair_cosine", "angular_distance"}


def test_spearman_is_1_for_the_same_order_and_minus_1_for_the_reverse():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_bad_settings_are_refused_before_scoring(tiny_models):
    with pytest.raises(LPError, match="--dtype 'int4'"):
        _scores(tiny_models["llama"], dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(LPError, match="no CUDA GPU"):
            _scores(tiny_models["llama"], device="cuda")
    with pytest.raises(LPError, match="does not exist"):
        _scores(tiny_models["llama"], calib="no-such-file.txt")


def test_cli_score_writes_the_scores_file_a_plot_and_a_json_summary(tiny_models, tmp_path):
    result = CliRunner().invoke(app, ["score", str(tiny_models["qwen2"]), "--calib", "news", "--tokens", "256",
                                      "--seq-len", "64", "-o", str(tmp_path / "s.json"), "--plot",
                                      str(tmp_path / "s.png"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(tmp_path / "s.json") and "pair_rel_l2" in summary["safest_pairs"]
    scores = load_scores(tmp_path / "s.json")
    assert scores["schema_version"] == 1 and (tmp_path / "s.png").stat().st_size > 10_000


def test_nan_weights_are_refused_naming_the_layer_and_the_tensor(tiny_models, tmp_path):
    """Issue 32: NaN measurements must not rank pairs; the message says where the stream breaks."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lpconvert.memory import recipe_setter

    folder = tmp_path / "nan"
    shutil.copytree(tiny_models["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.4.self_attn.o_proj.weight"][1, 2] = float("inf")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    source = resolve_model(str(folder))
    settings = ScoreSettings(calib="news", tokens=128, seq_len=64, device="cpu", dtype="float16")
    with pytest.raises(LPError) as refused:
        compute_scores(source, settings, setter=recipe_setter("score"))
    assert refused.value.one_line() == (
        f"score measured NaN or Inf on {folder}, starting at layer 4 (model.layers.4.self_attn.o_proj.weight holds "
        "NaN or Inf): no pair can be ranked from it (score.dtype: bfloat16, whose range does not overflow as "
        "float16's does; or check the weights)")
