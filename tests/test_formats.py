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
