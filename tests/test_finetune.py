"""Fine-tuning an export with PEFT and TRL, as a user does: LoRA on the usual Llama targets of an export with pairs
(Llama, and Gemma 3 whose pairs keep their branches apart until their post-norms), a few steps that lower the loss,
merge, save, reload, and the same logits; gradient checkpointing; TRL's SFTTrainer. Exports keep the checkpoint's
separate q/k/v and gate/up modules when loaded (nothing fused at load), which is what PEFT targets by name.
peft and trl are test dependencies only: lpconvert itself never calls them (docs/finetune.md has the recipe)."""

from __future__ import annotations

import pytest
import torch
from builders import cli_export

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
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


ARCHS = ["llama", "gemma3"]


def _export(tiny_models, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    export = cli_export(tiny_models[arch], tmp_path / "lp", pairs="2")
    return export, AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tiny_models, tmp_path):
    _, model = _export(tiny_models, arch, tmp_path)
    assert model.supports_gradient_checkpointing
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_trl_sft_with_lora_and_gradient_checkpointing_lowers_the_loss(arch, tiny_models, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    export, model = _export(tiny_models, arch, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(export)
    tokenizer.eos_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(2)  # the tiny tokenizer has none
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog " * 4] * 16})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, gradient_checkpointing=True, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, max_length=64, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=texts, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
