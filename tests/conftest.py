"""Shared fixtures: tiny random checkpoints of every supported architecture, and SmolLM2.

Fixtures only: what they are built from (TINY, make_tiny_model, ...) lives in builders.py, which
test modules import directly.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from builders import TINY_ARCHS, save_tiny_models


def pytest_configure(config):
    # Tests interrupt commands as Ctrl-C does. A shell that starts pytest in the background (`nohup ... &`) makes it
    # ignore SIGINT, every child inherits that, and an interrupted command would then run on until its time-out.
    # A handler instead of SIG_IGN is reset to the default in each child, as a terminal's commands have it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _compile_caches_of_this_run(tmp_path_factory):
    """vLLM's and inductor's compile caches, new for each run as on a fresh machine. The tiny exports come back
    at the same paths with the same configs run after run, and a graph compiled in an earlier run (for an
    earlier modeling file) once broke vLLM's pipeline-parallel start ("Compiling model again due to a load
    failure", then "a Tensor with 128 elements cannot be converted to Scalar")."""
    root = tmp_path_factory.mktemp("compile-caches")
    with pytest.MonkeyPatch.context() as patch:
        for name, folder in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
            if name not in os.environ:  # a cache the user chose stays theirs
                patch.setenv(name, str(root / folder))
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of each tiny random checkpoint, saved with save_pretrained (safetensors), with a tokenizer."""
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", params=list(TINY_ARCHS))
def tiny_model_dir(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once into the user cache."""
    from lpconvert.sources import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def smollm2_gguf_source(smollm2_dir):
    """SmolLM2 read from its GGUF (dequantised: about 15 s), once for every test that needs it."""
    from lpconvert.sources import resolve_model, smollm2_gguf

    return resolve_model(str(smollm2_gguf()))


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    # Nothing may reach a hub during tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # Off a terminal (as under CliRunner) progress would be plain lines on stderr; tests that read
    # stderr want the command's own output. test_progress.py switches the lines back on.
    monkeypatch.setenv("LPCONVERT_PROGRESS", "off")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
