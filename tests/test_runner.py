"""The layer runner reproduces the source model and the exported layer-parallel model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lpconvert.export import export, plan_for_pairs
from lpconvert.runner import LayerRunner
from lpconvert.sources import resolve_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_runner_loss_matches_source_and_export(arch, tiny_models, tmp_path):
    source = resolve_model(str(tiny_models[arch]))
    model = source.load_model()
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(model, seq_len=20)
    with torch.no_grad():
        total, count = runner.nll(runner.run(runner.embed(ids)), ids)
        assert abs(total / count - model(ids, labels=ids).loss.item()) < 1e-5
        export(source, plan_for_pairs(source, [1, 3]), tmp_path / "lp")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lp", trust_remote_code=True, dtype=torch.float32)
        total, count = runner.nll(runner.run(runner.embed(ids), pairs=[1, 3]), ids)
        assert abs(total / count - exported(ids, labels=ids).loss.item()) < 1e-5
        # Restarting from a captured stream gives the same result as running from the start.
        x3 = runner.run(runner.embed(ids), stop=3, pairs=[1])
        assert torch.allclose(runner.run(x3, start=3, pairs=[3]), runner.run(runner.embed(ids), pairs=[1, 3]))
