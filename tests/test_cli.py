"""The command line: help, inspect, export, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lpconvert.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from lpconvert.cli import app; "
            "r = CliRunner().invoke(app, ['export', '--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_module_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "lpconvert", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("lpconvert ")


def test_inspect_json(tiny_models):
    result = invoke("inspect", tiny_models["qwen3"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["supported"] and info["num_layers"] == 6 and info["num_key_value_heads"] == 2


def test_inspect_table(tiny_models):
    result = invoke("inspect", tiny_models["mistral"])
    assert result.exit_code == 0 and "Mistral" in result.stdout


def test_export_then_reuse_its_plan(tiny_models, tmp_path):
    first = invoke("export", tiny_models["llama"], "--pairs", "1,3", "-o", tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert "effective depth" in first.stdout and "·╔╝╔╝·" in first.stdout
    second = invoke("export", tiny_models["llama"], "--plan", tmp_path / "a" / "lpconvert-plan.json",
                    "-o", tmp_path / "b", "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["pairs"] == [[1, 2], [3, 4]]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_export_zero_pairs_warns(tiny_models, tmp_path):
    result = invoke("export", tiny_models["qwen2"], "--pairs", "none", "-o", tmp_path / "copy")
    assert result.exit_code == 0 and "no pairs" in result.stderr


def test_dry_run_json(tiny_models, tmp_path):
    result = invoke("export", tiny_models["qwen2"], "--pairs", "2", "-o", tmp_path / "out", "--dry-run", "--json",
                    "--max-shard-size", "50KB")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] and report["effective_depth"] == 5 and len(report["shards"]) > 1
    assert not (tmp_path / "out").exists()


def _plan_for_other_model(tiny_models, tmp_path):
    invoke("export", tiny_models["qwen2"], "--pairs", "2", "-o", tmp_path / "qwen2-export")
    return tmp_path / "qwen2-export" / "lpconvert-plan.json"


BAD_EXPORTS = {
    "pairs and plan": (["--pairs", "2", "--plan", "x.json"], "exactly one of --plan and --pairs"),
    "neither": ([], "exactly one of --plan and --pairs"),
    "overlap": (["--pairs", "1,2"], "overlap"),
    "out of range": (["--pairs", "9"], "out of range"),
    "edge": (["--pairs", "0"], "--allow-edge-layers"),
    "not numbers": (["--pairs", "a,b"], "comma-separated"),
    "dtype": (["--pairs", "2", "--dtype", "float8"], "--dtype 'float8' does not exist"),
    "shard size": (["--pairs", "2", "--max-shard-size", "big"], "size 'big'"),
    "missing plan": (["--plan", "nowhere.json"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_input(case, tiny_models, tmp_path):
    args, message = BAD_EXPORTS[case]
    result = invoke("export", tiny_models["llama"], "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_for_another_model_is_refused(tiny_models, tmp_path):
    plan = _plan_for_other_model(tiny_models, tmp_path)
    result = invoke("export", tiny_models["llama"], "--plan", plan, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "made for another model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    result = invoke("export", tiny_models["llama"], "--pairs", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_model(tmp_path):
    result = invoke("inspect", tmp_path / "nope")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_unsupported_architecture_export(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    described = invoke("inspect", tmp_path / "gpt2", "--json")
    assert described.exit_code == 0 and json.loads(described.stdout)["supported"] is False
    result = invoke("export", tmp_path / "gpt2", "--pairs", "1", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "supported: Llama (llama), Mistral (mistral)" in result.stderr
