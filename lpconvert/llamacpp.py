"""Running a GGUF in llama.cpp, through llama-cpp-python (the optional extra `lpconvert[llamacpp]`).

Used to check a GGUF export against the same model in transformers (tests, scripts/gguf_bench.py)
and to measure it where people run it. `exact=True` asks llama.cpp for what the comparison needs:
a float32 KV cache and no flash attention (the default f16 cache and flash attention each cost
about 1e-3 relative on the logits, on an unpaired model as much as on a paired one).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import LPError

INSTALL = "pip install 'lpconvert[llamacpp]' (llama-cpp-python 0.3.36, built from source in about 9 minutes)"


def check_installed() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise LPError("llama-cpp-python is not installed, and running a GGUF needs it", INSTALL) from None


def gguf_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata (arrays other than per-layer widths left out)."""
    from gguf import GGUFReader

    fields = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        fields[key] = field.contents()
    return fields


@contextlib.contextmanager
def open_gguf(path: Path, *, n_ctx: int = 2048, n_threads: int | None = None, exact: bool = True,
              logits_all: bool = False) -> Iterator:
    """A llama_cpp.Llama on `path`, closed on exit (its finaliser otherwise fails at interpreter exit)."""
    check_installed()
    from llama_cpp import Llama

    options = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads or os.cpu_count(), verbose=False,
                   logits_all=logits_all)
    if exact:
        options.update(type_k=0, type_v=0, flash_attn=False)  # GGML_TYPE_F32 KV cache
    try:
        llm = Llama(model_path=str(path), **options)
    except ValueError as exc:
        raise LPError(f"llama.cpp could not load {path}: {exc}", "check that the file is a complete GGUF") from None
    try:
        yield llm
    finally:
        llm.close()


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` in one fresh sequence (the model opened with logits_all)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` (argmax at every step, KV cache reused)."""
    llm.reset()
    out = []
    for token in llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


def decode_seconds(llm, prompt: list[int], new_tokens: int) -> float:
    """Seconds to decode `new_tokens` one at a time after `prompt` (prefill not counted)."""
    llm.reset()
    llm.eval(list(prompt))
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - started


def nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes each, and the count."""
    scores = logits(llm, ids)[:-1].astype(np.float64)
    peak = scores.max(-1, keepdims=True)
    log_z = np.log(np.exp(scores - peak).sum(-1)) + peak[:, 0]
    targets = np.asarray(ids[1:])
    return float((log_z - scores[np.arange(len(targets)), targets]).sum()), len(targets)
