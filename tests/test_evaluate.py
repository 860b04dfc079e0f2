"""Eval: the figures, the gate's exit codes, and refusal of models with different vocabularies."""

from __future__ import annotations

import json

import pytest
from builders import cli_export, save_other_vocabulary
from typer.testing import CliRunner

from lpconvert.cli import app
from lpconvert.formats import parse_percent

TEXT = ["--text", "news", "--split", "all", "--tokens", "512", "--seq-len", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    return cli_export(tiny_models["qwen2"], tmp_path_factory.mktemp("eval") / "lp", pairs="1,3")


def run_eval(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args), *TEXT])


def test_json_report_holds_depths_tokens_and_consistent_figures(tiny_models, converted):
    result = run_eval(tiny_models["qwen2"], converted, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["converted_depth"] == 4 and report["source_depth"] == 6
    assert report["tokens"] == 8 * 63 and 0 <= report["agreement"] <= 1 and report["kl_divergence"] > 0
    assert report["perplexity_increase"] == pytest.approx(
        report["perplexity_converted"] / report["perplexity_source"] - 1)
    assert report["passed"] and report["generation"]["converted"]


def test_identical_model_has_zero_kl(tiny_models, tmp_path):
    copy = cli_export(tiny_models["qwen2"], tmp_path / "copy", pairs="none")
    result = run_eval(tiny_models["qwen2"], copy, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["agreement"] == 1.0 and report["kl_divergence"] < 1e-6 and abs(report["perplexity_increase"]) < 1e-6


def test_gate_fails_with_exit_1_naming_the_figure(tiny_models, converted):
    result = run_eval(tiny_models["qwen2"], converted, "--max-ppl-increase", "0%", "--min-agreement", "1")
    assert result.exit_code == 1
    assert "perplexity increase" in result.stderr and "agreement" in result.stderr
    loose = run_eval(tiny_models["qwen2"], converted, "--max-ppl-increase", "1000%", "--min-agreement", "0")
    assert loose.exit_code == 0, loose.output


def test_different_vocabularies_are_refused(tiny_models, converted, tmp_path):
    other = save_other_vocabulary(tmp_path / "other", 96)
    result = run_eval(other, tiny_models["qwen2"])  # two plain models: nothing records a source to check
    assert result.exit_code == 2 and "different vocabulary sizes" in result.stderr
    result = run_eval(other, converted)  # an export names its source: a mismatch is caught first
    assert result.exit_code == 2 and "was converted from another model" in result.stderr


def test_percentages_read_with_or_without_the_percent_sign():
    assert parse_percent("10%", "--x") == pytest.approx(0.1) and parse_percent("25", "--x") == pytest.approx(0.25)
