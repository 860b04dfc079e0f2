"""Shared fixtures: tiny random checkpoints of every supported architecture, and SmolLM2.

Fixtures only: what they are built from (TINY, make_tiny_model, ...) lives in builders.py, which
test modules import directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from builders import TINY_ARCHS, save_tiny_models


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
