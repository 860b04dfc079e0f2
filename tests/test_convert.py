"""Convert: the recipe round trip, the gate's exit codes, and what lands in OUT."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lpconvert.cli import app
from lpconvert.convert import load_recipe, recipe_yaml
from lpconvert.errors import LPError

FAST = """
score: {calib: news, tokens: 256, seq_len: 64, device: cpu}
plan: {target: {pairs: 1}, strategy: greedy, metric: pair_rel_l2}
eval: {text: news, split: all, tokens: 256, seq_len: 64, device: cpu, new_tokens: 4, %s}
"""


def _recipe(tmp_path, gate: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(FAST % gate)
    return str(path)


def test_recipe_round_trip(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "max_ppl_increase: 50%"))
    assert recipe["plan"]["target"] == {"pairs": 1} and recipe["score"]["tokens"] == 256
    assert recipe["export"]["max_shard_size"] == "5GB"  # defaults fill what the recipe leaves out
    (tmp_path / "again.yaml").write_text(recipe_yaml(recipe))
    assert load_recipe(tmp_path / "again.yaml") == recipe


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        assert load_recipe(path)["plan"]["target"]


@pytest.mark.parametrize("content, message", [
    ("score: {tokns: 5}", "did you mean 'tokens'"),
    ("scroe: {}", "did you mean 'score'"),
    ("score: [1, 2", "not valid YAML"),
    ("plan: {target: {depth: 2, pairs: 1}}", "exactly one of"),
])
def test_bad_recipes(tmp_path, content, message):
    (tmp_path / "r.yaml").write_text(content)
    with pytest.raises(LPError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_convert_passes_and_writes_everything(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(out), "--recipe",
                                      _recipe(tmp_path, "max_ppl_increase: 1000%"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["passed"] and len(summary["pairs"]) == 1
    for name in ("lpconvert-recipe.yaml", "lpconvert-scores.json", "lpconvert-plan.json", "lpconvert-eval.json",
                 "config.json", "modeling_lpconvert.py", "model.safetensors"):
        assert (out / name).exists(), name
    assert load_recipe(out / "lpconvert-recipe.yaml")["plan"]["target"] == {"pairs": 1}


def test_failed_gate_exits_1_and_leaves_nothing(tiny_models, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(tiny_models["llama"]), "-o", str(out), "--recipe", _recipe(tmp_path, "min_agreement: 1.01")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "agreement" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "lpconvert-tmp" in p.name]
    kept = CliRunner().invoke(app, [*args, "--keep-failed"])
    assert kept.exit_code == 1 and (out / "lpconvert-eval.json").exists()


def test_bad_recipe_exits_2(tiny_models, tmp_path):
    (tmp_path / "r.yaml").write_text("export: {dtyp: bfloat16}")
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "out"),
                                      "--recipe", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "did you mean 'dtype'" in result.stderr
