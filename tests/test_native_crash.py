"""A crash in native code (llama.cpp) must not take lpconvert, or this test suite, down with it.

llama.cpp runs in a child process (lpconvert/llamacppworker.py). These tests make that child crash for
real (a segfault through ctypes, an abort) and check what the parent does: one LPError naming the
signal and the fix, `eval` exiting 2 with one line, and a pytest run that goes on to its next test.
They also check the AMX rule: llama.cpp's repacked weight buffers are off on a CPU with AMX, where
q8_0 crashes with them (issue 32), and on elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from builders import invoke, save_byte_level_model

import lpconvert.llamacppworker as worker
from lpconvert.errors import LPError
from lpconvert.llamacpp import logits, open_gguf

EVAL_QUICK = ("--text", "news", "--split", "all", "--tokens", "128", "--seq-len", "32", "--device", "cpu")


def serve_then_segfault(conn, path, options, repack):
    """A test double for llama.cpp: loads, answers nothing, and dies of a real SIGSEGV at the first request."""
    conn.send(("ok", None))
    conn.recv()
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def serve_then_abort(conn, path, options, repack):
    conn.send(("ok", None))
    conn.recv()
    os.abort()


def segfault_while_loading(conn, path, options, repack):
    ctypes.string_at(0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """(a byte-level tiny Llama, its q8_0 GGUF export with pair 2)."""
    root = tmp_path_factory.mktemp("native")
    model = save_byte_level_model(root / "model", "llama")
    gguf = root / "lp.gguf"
    result = invoke("export", model, "--pairs", "2", "-o", gguf, "--gguf-type", "q8_0")
    assert result.exit_code == 0, result.output
    return model, gguf


@pytest.mark.parametrize("serve, signal_name", [(serve_then_segfault, "SIGSEGV"), (serve_then_abort, "SIGABRT"),
                                                (segfault_while_loading, "SIGSEGV")])
def test_a_native_crash_is_an_error_not_a_dead_process(serve, signal_name, tiny_gguf, monkeypatch):
    _, gguf = tiny_gguf
    monkeypatch.setattr(worker.LlamaProcess, "child_main", staticmethod(serve))
    with pytest.raises(worker.NativeCrash) as raised:
        with open_gguf(gguf, n_ctx=64, logits_all=True, n_threads=1) as llm:
            logits(llm, [1, 2, 3])
    assert f"llama.cpp crashed with {signal_name}" in raised.value.problem
    assert "docs/gguf.md" in raised.value.fix
    assert isinstance(raised.value, LPError)
    monkeypatch.undo()  # and this process still runs llama.cpp
    with open_gguf(gguf, n_ctx=64, logits_all=True, n_threads=1) as llm:
        assert logits(llm, [1, 2, 3]).shape == (3, 320)


def test_eval_of_a_crashing_gguf_is_one_line_and_exit_2(tiny_gguf, monkeypatch):
    model, gguf = tiny_gguf
    monkeypatch.setattr(worker.LlamaProcess, "child_main", staticmethod(serve_then_segfault))
    result = invoke("eval", model, gguf, *EVAL_QUICK)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "llama.cpp crashed with SIGSEGV" in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_a_crashing_test_fails_alone_and_the_run_goes_on(tmp_path):
    """A pytest run whose first test crashes llama.cpp's process for real: that test fails, the next one runs."""
    tests = Path(__file__).resolve().parent
    (tmp_path / "test_crash.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]
        import lpconvert.llamacppworker as worker
        from test_native_crash import serve_then_segfault

        def test_crashes():
            worker.LlamaProcess.child_main = staticmethod(serve_then_segfault)
            process = worker.LlamaProcess("any.gguf", {{}})
            process.logits([1, 2])

        def test_runs_after():
            assert True
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert "llama.cpp crashed with SIGSEGV" in run.stdout


def _cpuinfo(tmp_path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_amx_is_read_from_cpuinfo(tmp_path, monkeypatch):
    assert worker.cpu_has_amx(_cpuinfo(tmp_path, "avx512f amx_bf16 amx_tile amx_int8"))
    assert not worker.cpu_has_amx(_cpuinfo(tmp_path, "avx512f avx512_vnni"))
    assert not worker.cpu_has_amx(tmp_path / "missing")
    monkeypatch.setattr(worker, "CPUINFO", _cpuinfo(tmp_path, "amx_int8"))
    monkeypatch.delenv(worker.REPACK_ENV, raising=False)
    assert worker.use_repacking() is False  # AMX: off by default
    monkeypatch.setenv(worker.REPACK_ENV, "on")
    assert worker.use_repacking() is True
    monkeypatch.setattr(worker, "CPUINFO", _cpuinfo(tmp_path, "avx2"))
    monkeypatch.setenv(worker.REPACK_ENV, "auto")
    assert worker.use_repacking() is True  # no AMX: llama.cpp's default
    monkeypatch.setenv(worker.REPACK_ENV, "off")
    assert worker.use_repacking() is False
    monkeypatch.setenv(worker.REPACK_ENV, "sometimes")
    with pytest.raises(LPError, match="LPCONVERT_LLAMACPP_REPACK is 'sometimes'"):
        worker.use_repacking()


def test_q8_0_runs_on_this_cpu_with_the_default_rule(tiny_gguf, monkeypatch):
    """On an AMX CPU (this test's machine or not) q8_0 runs because repacking is off; elsewhere it runs as always."""
    monkeypatch.delenv(worker.REPACK_ENV, raising=False)
    _, gguf = tiny_gguf
    with open_gguf(gguf, n_ctx=64, logits_all=True, n_threads=1) as llm:
        assert llm.repack is (not worker.cpu_has_amx())
        out = logits(llm, list(range(3, 40)))
    assert out.shape == (37, 320) and (out == out).all()


@pytest.mark.skipif(not worker.cpu_has_amx(), reason="needs a CPU with AMX (amx_int8 in /proc/cpuinfo)")
def test_repacked_q8_0_on_amx_crashes_in_its_own_process_or_runs(tiny_gguf, monkeypatch):
    """What the default rule avoids: with repacking forced on, llama.cpp 0.3.36 crashes on some AMX machines
    (SIGSEGV or SIGILL at the first decode). Either way lpconvert's process survives and says how to avoid it."""
    monkeypatch.setenv(worker.REPACK_ENV, "on")
    _, gguf = tiny_gguf
    try:
        with open_gguf(gguf, n_ctx=64, logits_all=True, n_threads=1) as llm:
            logits(llm, list(range(3, 40)))
    except worker.NativeCrash as crash:
        assert "this CPU has AMX" in crash.fix and "LPCONVERT_LLAMACPP_REPACK" in crash.fix


def test_without_llama_cpp_python_it_says_what_to_install(tiny_gguf, monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else found(name, *a))
    model, gguf = tiny_gguf
    result = invoke("eval", model, gguf, *EVAL_QUICK)
    assert result.exit_code == 2 and "llama-cpp-python is not installed" in result.stderr, result.output
    assert "pip install 'lpconvert[llamacpp]'" in result.stderr


@pytest.mark.parametrize("flags, gguf_type, hinted", [("amx_int8", "q8_0", True), ("avx2", "q8_0", False),
                                                      ("amx_int8", "f16", False)])
def test_the_export_summary_names_no_repack_for_q8_0_on_amx(flags, gguf_type, hinted, tiny_gguf, tmp_path,
                                                            monkeypatch):
    model, _ = tiny_gguf
    monkeypatch.setattr(worker, "CPUINFO", _cpuinfo(tmp_path, flags))
    monkeypatch.setenv("COLUMNS", "250")
    result = invoke("export", model, "--pairs", "2", "-o", tmp_path / "x.gguf", "--gguf-type", gguf_type)
    assert result.exit_code == 0, result.output
    assert ("add -nr, --no-repack" in result.stdout) is hinted, result.stdout
