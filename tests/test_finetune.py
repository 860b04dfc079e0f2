"""Fine-tuning an export with PEFT, as a user does: LoRA on the usual Llama targets of an export with pairs,
a few steps that lower the loss, merge, save, reload, and the same logits. Exports keep the checkpoint's
separate q/k/v and gate/up modules when loaded (nothing fused at load), which is what PEFT targets by name.
peft is a test dependency only: lpconvert itself never calls it."""

from __future__ import annotations

import pytest
import torch
from builders import cli_export

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


GEMMA3_PAIRS = pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "a Gemma 3 pair's o_proj and down_proj are LPBranchLinear (each half kept apart for its post-norm: a "
    "halves x out x in weight), which PEFT cannot wrap; issue 34"))


@pytest.mark.parametrize("arch", ["llama", pytest.param("gemma3", marks=GEMMA3_PAIRS)])
def test_lora_on_an_export_trains_merges_saves_and_reloads(arch, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    export = cli_export(tiny_models[arch], tmp_path / "lp", pairs="2")
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(TARGETS)
    pair = [name for name, _ in lora.named_modules() if ".layers.2.self_attn.q_proj" in name]
    assert pair, "the pair's block is a target like any other"

    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    lora.train()
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    merged = lora.merge_and_unload().eval()
    with torch.no_grad():
        want = merged(ids).logits
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(reloaded.state_dict()) == set(merged.state_dict())


def test_gradient_checkpointing_trains_an_export(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    export = cli_export(tiny_models["llama"], tmp_path / "lp", pairs="2")
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    if not model.supports_gradient_checkpointing:
        pytest.xfail("the exported modeling file does not support gradient checkpointing yet (issue 34)")
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
