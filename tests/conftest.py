"""Shared fixtures: tiny random checkpoints of every supported architecture, and SmolLM2.

The tiny models have random norm weights and biases (not ones and zeros), so that folding norms
into projections and summing biases is really exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            rms_norm_eps=1e-6)

# name -> (config class name, extra config fields)
TINY_ARCHS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True,
                                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict()),
}


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_tiny_model(arch: str, seed: int = 0):
    import transformers

    config_cls, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    return model.eval()


def make_tiny_tokenizer(vocab_size: int = 128):
    """A character-level BPE tokenizer of `vocab_size` tokens, trained on the built-in news text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lpconvert.texts import resolve_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator([resolve_text("news").text[:100_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of each tiny random checkpoint, saved with save_pretrained (safetensors), with a tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tiny_tokenizer(TINY["vocab_size"])
    folders = {}
    for i, arch in enumerate(TINY_ARCHS):
        folder = root / arch
        make_tiny_model(arch, seed=i).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[arch] = folder
    return folders


@pytest.fixture(scope="session", params=list(TINY_ARCHS))
def tiny_model_dir(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once into the user cache."""
    from lpconvert.sources import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    # Nothing may reach a hub during tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # Off a terminal (as under CliRunner) progress would be plain lines on stderr; tests that read
    # stderr want the command's own output. test_progress.py switches the lines back on.
    monkeypatch.setenv("LPCONVERT_PROGRESS", "off")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
