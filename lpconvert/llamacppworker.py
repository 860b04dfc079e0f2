"""llama.cpp in a child process, so that a crash in native code is one clear error, never a dead lpconvert.

Why a process of its own: llama.cpp is C++, and a fault in it (a segfault in a kernel, an abort on an
assertion) kills the process it runs in, with no Python exception to catch. On CPUs with AMX (Sapphire
Rapids and later Xeons) llama.cpp 0.3.36's repacked q8_0 kernels do exactly that at the first decode
(ggml-org/llama.cpp#20824). In a child, the crash ends the child: the parent sees its exit signal and
raises an LPError that names it and the way around it, and whatever called it (eval, bench, a test)
goes on or exits with one line.

Why repacking is off on AMX CPUs: llama.cpp's "extra buffer types" are where it keeps weights repacked
for the AMX and AVX/NEON tile kernels. With them off (`use_extra_bufts = False`, llama-cli's
`--no-repack`), q8_0 runs the plain kernels and works; f16/bf16/f32 never used them. So on an AMX CPU
lpconvert turns them off by default; LPCONVERT_LLAMACPP_REPACK=on turns them back on (a llama.cpp
that has fixed the crash), =off turns them off everywhere. docs/gguf.md has the measured cost.

The protocol is a pipe of pickled (operation, arguments) requests, one answer each: ("ok", value) or
("error", kind, message). Logits come back as numpy arrays; the per-token loops that bench times
(decode_seconds, prefill_seconds) run inside the child, so no pipe round trip is in a timed region.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from .errors import LPError

REPACK_ENV = "LPCONVERT_LLAMACPP_REPACK"
CPUINFO = Path("/proc/cpuinfo")
AMX_FLAGS = ("amx_int8", "amx_bf16", "amx_tile")


def cpu_has_amx(cpuinfo: Path | None = None) -> bool:
    """Whether this CPU reports AMX (Linux's /proc/cpuinfo flags; False where there is no such file)."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in AMX_FLAGS)


def use_repacking() -> bool:
    """llama.cpp's extra (repacked) weight buffers: on, except on AMX CPUs where they crash; the env var decides first."""
    choice = os.environ.get(REPACK_ENV, "auto").strip().lower()
    if choice in ("on", "1", "true", "yes"):
        return True
    if choice in ("off", "0", "false", "no"):
        return False
    if choice != "auto":
        raise LPError(f"{REPACK_ENV} is {choice!r}, not one of auto, on, off", f"set {REPACK_ENV}=auto, on or off")
    return not cpu_has_amx()


# ----------------------------------------------------------------------------------------------
# The child: one Llama, and the operations the parent asks of it


def _open_llama(path: str, options: dict, repack: bool):
    """llama_cpp.Llama(path, **options), with llama.cpp's extra weight buffers as `repack` says. Llama() takes no
    argument for them: the default model params it starts from are changed while it is built (this process runs
    nothing else)."""
    import llama_cpp
    import llama_cpp.llama_cpp as native

    default_params = native.llama_model_default_params

    def params():
        made = default_params()
        made.use_extra_bufts = repack
        return made

    native.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, **options)
    finally:
        native.llama_model_default_params = default_params


def _last_argmax(llm) -> int:
    return int(np.argmax(llm.scores[llm.n_tokens - 1]))


def op_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` in one fresh sequence (the model opened with logits_all)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def op_last_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at the last position of `ids` only, shape (1, vocab)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[llm.n_tokens - 1: llm.n_tokens], dtype=np.float32)


def op_start(llm, ids: list[int]) -> int:
    """A fresh sequence of `ids`; the greedy next token."""
    llm.reset()
    llm.eval(list(ids))
    return _last_argmax(llm)


def op_step(llm, token: int) -> int:
    """`token` appended to the sequence; the greedy next token (KV cache reused)."""
    llm.eval([token])
    return _last_argmax(llm)


def op_greedy(llm, ids: list[int], new_tokens: int, min_new_tokens: int | None = None) -> list[int]:
    """Greedy continuation of `ids`, argmax at every step. With min_new_tokens, it stops at the end-of-text token
    once that many are out (as transformers' generate does); without, it runs `new_tokens` steps."""
    return op_greedy_clocked(llm, ids, new_tokens, new_tokens if min_new_tokens is None else min_new_tokens)[0]


def op_greedy_clocked(llm, ids: list[int], new_tokens: int, min_new_tokens: int) -> tuple[list[int], list[float]]:
    """op_greedy (stopping at end-of-text once min_new_tokens are out), and time.perf_counter() as each token came
    out: CLOCK_MONOTONIC, the same clock in every process, so the parent can time the steps without a pipe round
    trip inside them."""
    out, clock = [op_start(llm, ids)], [time.perf_counter()]
    eos = llm.token_eos()
    while len(out) < new_tokens and not (out[-1] == eos and len(out) >= min_new_tokens):
        out.append(op_step(llm, out[-1]))
        clock.append(time.perf_counter())
    return out, clock


def op_decode_seconds(llm, prompt: list[int], new_tokens: int) -> float:
    """Seconds to decode `new_tokens` one at a time after `prompt` (prefill not counted)."""
    token = op_start(llm, prompt)
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = op_step(llm, token)
    return time.perf_counter() - started


def op_prefill_seconds(llm, ids: list[int]) -> float:
    llm.reset()
    started = time.perf_counter()
    llm.eval(list(ids))
    return time.perf_counter() - started


def op_nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes each, and the count."""
    scores = op_logits(llm, ids)[:-1].astype(np.float64)
    peak = scores.max(-1, keepdims=True)
    log_z = np.log(np.exp(scores - peak).sum(-1)) + peak[:, 0]
    targets = np.asarray(ids[1:])
    return float((log_z - scores[np.arange(len(targets)), targets]).sum()), len(targets)


def op_call(llm, name: str, args: tuple, kwargs: dict):
    """Any other method of llama_cpp.Llama (tokenize, create_chat_completion, ...)."""
    return getattr(llm, name)(*args, **kwargs)


def op_attribute(llm, name: str):
    return getattr(llm, name)


OPERATIONS = {"logits": op_logits, "last_logits": op_last_logits, "start": op_start, "step": op_step,
              "greedy": op_greedy, "greedy_clocked": op_greedy_clocked, "decode_seconds": op_decode_seconds, "prefill_seconds": op_prefill_seconds,
              "nll": op_nll, "call": op_call, "attribute": op_attribute}

# llama.cpp logs a paired model's V-cache padding (every layer padded to the widest layer's width when
# flash attention is off; docs/gguf.md) at error level: expected here, so not shown.
_EXPECTED_ERRORS = ("padding V cache",)


def _quiet_llama_logs() -> None:
    """llama.cpp's messages at error level reach stderr, less the expected ones; nothing else does."""
    import ctypes
    import sys

    import llama_cpp

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data) -> None:
        message = text.decode("utf-8", "replace")
        if level == 3 and not any(expected in message for expected in _EXPECTED_ERRORS):
            sys.stderr.write(message)

    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
    _quiet_llama_logs.keep = forward  # llama.cpp calls it for as long as the process lives


def serve(conn, path: str, options: dict, repack: bool) -> None:
    """The child's loop: open the model, then answer requests until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    _quiet_llama_logs()
    try:
        llm = _open_llama(path, options, repack)
    except Exception as exc:  # noqa: BLE001 - every load failure goes back to the parent as one message
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    conn.send(("ok", None))
    with contextlib.closing(llm):
        while True:
            try:
                operation, args, kwargs = conn.recv()
            except EOFError:
                return
            try:
                result = OPERATIONS[operation](llm, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                conn.send(("error", type(exc).__name__, str(exc)))
                continue
            if isinstance(result, np.ndarray):  # logits: raw bytes after a header, not a pickle (3 copies fewer)
                conn.send(("array", result.shape, result.dtype.str))
                conn.send_bytes(memoryview(np.ascontiguousarray(result)).cast("B"))
            else:
                conn.send(("ok", result))


# ----------------------------------------------------------------------------------------------
# The parent's handle


class NativeCrash(LPError):
    """llama.cpp's process died (a signal, or an exit without an answer)."""


def crash_fix(repack: bool) -> str:
    if repack and cpu_has_amx():
        return (f"this CPU has AMX, where llama.cpp's repacked q8_0 kernels crash (llama.cpp#20824): unset "
                f"{REPACK_ENV} or set it to off, or export with --gguf-type f16; docs/gguf.md")
    return "export with --gguf-type f16 and run it again, or report the file and this line to llama.cpp; docs/gguf.md"


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"with {signal.Signals(-code).name}"
        except ValueError:
            return f"with signal {-code}"
    return f"(exit code {code})"


class LlamaProcess:
    """llama_cpp.Llama on `path`, in a child process. Methods are the OPERATIONS above; any other attribute is
    the Llama's own method (`tokenize`, `create_chat_completion`, ...) or value (`metadata`), run in the child."""

    child_main = staticmethod(serve)  # the child's entry point (tests put one here that crashes)

    def __init__(self, path: Path, options: dict):
        self.path = Path(path)
        self.repack = use_repacking()
        self._eos = None
        # A plain `python -m lpconvert.llamacppworker`, not multiprocessing: its spawn re-runs the caller's main
        # module (a script without a __main__ guard, or stdin), and fork would copy a process holding torch's threads.
        parent_end, child_end = socket.socketpair()
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(child_end.fileno())],
                                          pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL)
        child_end.close()
        self._conn = Connection(parent_end.detach())
        entry = self.child_main
        self._conn.send((f"{entry.__module__}:{entry.__qualname__}", sys.path, str(self.path), options, self.repack))
        try:
            self._answer("loading")
        except LPError:
            self.close()
            raise

    def _answer(self, doing: str):
        """The child's answer; a dead child is noticed within 0.2 s and raised as NativeCrash."""
        while not self._conn.poll(0.2):
            if self._process.poll() is not None:
                break
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):
            code = self._wait(5)
            self._conn.close()
            raise NativeCrash(f"llama.cpp crashed {_exit_description(code)} while {doing} {self.path.name} "
                              f"(in its own process: lpconvert is fine)", crash_fix(self.repack)) from None
        if answer[0] == "error":
            _, kind, message = answer
            if doing == "loading":
                raise LPError(f"llama.cpp could not load {self.path}: {message}",
                              "check that the file is a complete GGUF")
            raise RuntimeError(f"llama.cpp {doing}: {kind}: {message}")
        if answer[0] == "array":
            _, shape, dtype = answer
            array = np.empty(shape, dtype=np.dtype(dtype))
            self._conn.recv_bytes_into(memoryview(array).cast("B"))
            return array
        return answer[1]

    def _wait(self, seconds: float) -> int | None:
        try:
            return self._process.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def request(self, operation: str, *args, **kwargs):
        if self._conn.closed:
            raise RuntimeError(f"the llama.cpp process for {self.path.name} is closed")
        self._conn.send((operation, args, kwargs))
        return self._answer(f"running {operation} on")

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.request("logits", list(ids))

    def last_logits(self, ids: list[int]) -> np.ndarray:
        return self.request("last_logits", list(ids))

    def start(self, ids: list[int]) -> int:
        return self.request("start", list(ids))

    def step(self, token: int) -> int:
        return self.request("step", int(token))

    def greedy(self, ids: list[int], new_tokens: int, min_new_tokens: int | None = None) -> list[int]:
        return self.request("greedy", list(ids), new_tokens, min_new_tokens)

    def greedy_clocked(self, ids: list[int], new_tokens: int, min_new_tokens: int) -> tuple[list[int], list[float]]:
        return self.request("greedy_clocked", list(ids), new_tokens, min_new_tokens)

    def decode_seconds(self, prompt: list[int], new_tokens: int) -> float:
        return self.request("decode_seconds", list(prompt), new_tokens)

    def prefill_seconds(self, ids: list[int]) -> float:
        return self.request("prefill_seconds", list(ids))

    def nll(self, ids: list[int]) -> tuple[float, int]:
        return self.request("nll", list(ids))

    @property
    def eos(self) -> int:
        """The end-of-text token (asked once)."""
        if self._eos is None:
            self._eos = self.request("call", "token_eos", (), {})
        return self._eos

    @property
    def metadata(self) -> dict:
        return self.request("attribute", "metadata")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.request("call", name, args, kwargs)

    def close(self) -> None:
        """Stop the child: the pipe closed (it exits on its own), then terminated, then killed, if it has not."""
        if not self._conn.closed:
            self._conn.close()
        for stop in (None, self._process.terminate, self._process.kill):
            if stop is not None:
                stop()
            if self._wait(2) is not None:
                return


def _child(fd: int) -> None:
    """The child process's start: the first message names the entry point and what it serves."""
    conn = Connection(fd)
    entry, parent_path, path, options, repack = conn.recv()
    sys.path[:0] = [p for p in parent_path if p not in sys.path]
    module, qualname = entry.split(":")
    function = importlib.import_module(module)
    for part in qualname.split("."):
        function = getattr(function, part)
    function(conn, path, options, repack)


if __name__ == "__main__":
    _child(int(sys.argv[1]))
