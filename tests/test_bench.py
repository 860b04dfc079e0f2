"""Bench: the JSON a CI job reads, on the CPU with tiny models. Bad bench input is in test_errors.CASES."""

from __future__ import annotations

import json

import pytest
import torch
from builders import cli_export
from typer.testing import CliRunner

from lpconvert.bench import _time_decode, middle_pairs, random_source_model
from lpconvert.cli import app
from lpconvert.errors import LPError

FAST = ["--device", "cpu", "--dtype", "float32", "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1",
        "--warmup", "0", "--json"]


def test_random_weights_json_has_a_row_and_a_speedup_per_pair_count():
    result = CliRunner().invoke(app, ["bench", "--random-weights", "tiny", "--pair-counts", "0,2", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["model"] for r in report["rows"]] == ["source", "lp-0", "lp-2"]
    for row in report["rows"]:
        assert row["batch"] == 1 and row["mode"] == "eager"
        for rate in ("decode", "prefill"):  # tokens over a positive time: positive however loaded the machine
            assert row[f"{rate}_tokens_per_s"] > 0
            assert len(row[f"{rate}_spread"]) == 2 and min(row[f"{rate}_spread"]) > 0
    assert [s["model"] for s in report["speedups"]] == ["lp-0", "lp-2"]
    assert all(s["decode"] > 0 and s["prefill"] > 0 for s in report["speedups"])


def test_decode_is_timed_over_exactly_the_new_tokens_after_the_prefills_one():
    model = random_source_model("tiny", torch.float32, "cpu")
    prompt = torch.randint(0, model.config.vocab_size, (2, 8))
    steps, seconds = _time_decode(model, prompt, torch.ones_like(prompt), 5, dict(do_sample=False, pad_token_id=0))
    assert steps == 5 and seconds > 0


def test_model_against_its_baseline_has_a_row_per_batch_size_and_a_speedup_each(tiny_models, tmp_path):
    cli_export(tiny_models["llama"], tmp_path / "lp")
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "lp"), "--baseline", str(tiny_models["llama"]),
                                      "--batch-size", "1,2", *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["model"], r["batch"]) for r in report["rows"]] == [("baseline", 1), ("baseline", 2), ("model", 1),
                                                                   ("model", 2)]
    assert len(report["speedups"]) == 2 and report["speedups"][0]["decode"] > 0


def test_middle_pairs_sit_every_other_layer_around_the_middle_and_must_fit():
    assert middle_pairs(32, 7) == [9, 11, 13, 15, 17, 19, 21]
    assert middle_pairs(32, 0) == []
    with pytest.raises(LPError):
        middle_pairs(8, 4)
