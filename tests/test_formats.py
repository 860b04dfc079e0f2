"""Plan JSON, pair validation and the model fingerprint."""

from __future__ import annotations

import json

import pytest

from lpconvert.errors import LPError
from lpconvert.formats import Plan, blocks_for, layer_strip, load_plan, parse_pairs, validate_pairs

SOURCE = {"architecture": "llama", "num_layers": 8, "config_sha256": "a", "weights_sha256": "b"}


def test_pairs_become_blocks_and_a_layer_strip():
    assert blocks_for([2, 4], 8) == [[0], [1], [2, 3], [4, 5], [6], [7]]
    assert layer_strip([2, 4], 8) == "··╔╝╔╝··"


@pytest.mark.parametrize("pairs, message", [
    ([3, 4], "overlap"),
    ([7], "out of range"),
    ([-1], "out of range"),
    ([0], "first or last layer"),
    ([6], "first or last layer"),
    (["x"], "not a layer index"),
])
def test_bad_pairs_are_refused(pairs, message):
    with pytest.raises(LPError, match=message):
        validate_pairs(pairs, 8)


def test_edge_layers_allowed_on_request():
    assert validate_pairs([6, 0], 8, allow_edge_layers=True) == [0, 6]


def test_pairs_are_read_as_comma_separated_integers():
    assert parse_pairs("12, 14,16") == [12, 14, 16]
    with pytest.raises(LPError, match="comma-separated"):
        parse_pairs("12-13")


def test_plan_saved_and_loaded_keeps_its_pairs_and_strategy(tmp_path):
    plan = Plan(source=SOURCE, pairs=[2, 4], strategy="greedy", metric="pair_rel_l2")
    plan.save(tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded.pairs == [2, 4] and loaded.effective_depth == 6 and loaded.strategy == "greedy"
    assert json.loads((tmp_path / "plan.json").read_text())["pairs"] == [[2, 3], [4, 5]]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"kind": "other"}', "not an lpconvert plan"),
    ('{"kind": "lpconvert-plan", "schema_version": 99}', "schema_version"),
    ('{"kind": "lpconvert-plan", "schema_version": 1, "pairs": [[2, 4]], "source": {"num_layers": 8}}',
     "not two consecutive"),
    ('{"kind": "lpconvert-plan", "schema_version": 1}', "lacks valid"),
])
def test_bad_plan_files_are_refused_saying_what_is_wrong(tmp_path, content, message):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(LPError, match=message):
        load_plan(tmp_path / "plan.json")


def test_same_origin_accepts_a_source_and_its_exports_in_either_order(tiny_models, tmp_path):
    from builders import cli_export

    from lpconvert.formats import check_same_origin
    from lpconvert.sources import resolve_model

    source = resolve_model(str(tiny_models["llama"]))
    a = resolve_model(str(cli_export(tiny_models["llama"], tmp_path / "a", "--pairs", "1")))
    b = resolve_model(str(cli_export(tiny_models["llama"], tmp_path / "b", "--pairs", "2")))
    for x, y in ((a, source), (source, a), (a, b)):
        check_same_origin(x, y)
    other = resolve_model(str(cli_export(tiny_models["qwen2"], tmp_path / "c", "--pairs", "2")))
    with pytest.raises(LPError, match="do not come from the same source model"):
        check_same_origin(a, other)


def test_an_export_records_a_digest_of_its_source_weights(tiny_models, tmp_path):
    """Shapes alone cannot tell a model from its fine-tune; a few of its values can, in any float dtype."""
    import json

    import torch
    from builders import cli_export, make_tiny_model
    from transformers import AutoModelForCausalLM

    def digest_of(model_dir, out):
        return json.loads((cli_export(model_dir, out, "--pairs", "2") / "config.json").read_text()
                          )["lp_source"]["content_sha256"]

    bf16 = tmp_path / "bf16"  # the same weights stored in bfloat16
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16).save_pretrained(bf16)
    tuned = tmp_path / "tuned"  # same shapes, other weights
    make_tiny_model("llama", seed=7).save_pretrained(tuned)
    digest = digest_of(tiny_models["llama"], tmp_path / "a")
    assert len(digest) == 64 and digest_of(bf16, tmp_path / "b") == digest
    assert digest_of(tuned, tmp_path / "c") != digest
