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


def test_a_percentage_is_written_with_its_sign_on_the_command_line_and_in_a_recipe():
    from lpconvert.errors import LPError
    from lpconvert.settings import check_setting

    assert parse_percent("10%", "--x") == pytest.approx(0.1) and parse_percent("0", "--x") == 0
    assert check_setting("tasks", "min_retained", "97%", "tasks.min_retained") == pytest.approx(0.97)
    for typed in ("25", "0.97", 0.97, 97):  # 0.97 is 97% to some and 0.97% to others: neither is guessed
        with pytest.raises(LPError, match="has no % sign, so it is ambiguous"):
            check_setting("tasks", "min_retained", typed, "tasks.min_retained")


def test_a_figure_that_is_not_finite_fails_the_gate_with_or_without_bounds():
    from lpconvert.evaluate import gate_failures
    from lpconvert.settings import EvalSettings

    fine = {"perplexity_source": 10.0, "perplexity_converted": 11.0, "perplexity_increase": 0.1, "agreement": 0.9,
            "kl_divergence": 0.1}
    assert gate_failures(fine, EvalSettings(max_ppl_increase=0.2, min_agreement=0.8)) == []
    assert gate_failures(fine, EvalSettings(max_ppl_increase=0.05)) == ["perplexity increase 10% exceeds 5%"]
    for broken in ({"perplexity_converted": float("nan"), "perplexity_increase": float("nan")},
                   {"perplexity_converted": float("inf"), "perplexity_increase": float("inf")},
                   {"kl_divergence": float("nan")}):
        for settings in (EvalSettings(), EvalSettings(max_ppl_increase=0.5, min_agreement=0.0)):
            (failure,) = gate_failures({**fine, **broken}, settings)
            assert "not finite" in failure
