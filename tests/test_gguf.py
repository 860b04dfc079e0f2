"""GGUF export: llama.cpp (through llama-cpp-python) runs the exported file as transformers runs the
safetensors export of the same plan: same logits, same greedy text, same tokens, same chat template.

Tolerance: the largest logit difference over every position and vocabulary entry, relative to the
largest logit, must stay under 1e-4 with a float32 GGUF and a float32 KV cache (measured: about 2e-6,
the order of float32 summation differences between two engines).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import (
    CHATML,
    QUICK_RECIPE,
    interrupt_while_writing,
    invoke,
    save_byte_level_model,
    slow_export_script,
)

from lpconvert.llamacpp import gguf_metadata, greedy, logits, open_gguf
from lpconvert.sources import resolve_model

TOLERANCE = 1e-4
PROMPT_LEN = 24

# name -> (architecture, config overrides): every layout llama.cpp's deci graph must express
VARIANTS = {
    "llama": ("llama", {}),  # tied embeddings
    "llama-bias": ("llama-bias", {}),  # q/k/v/o and MLP biases, linear rope scaling
    "llama3-rope": ("llama", {"tie_word_embeddings": False,
                              "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "mistral": ("mistral", {"sliding_window": None}),  # Mistral 7B v0.2 and later
    "qwen2": ("qwen2", {}),  # q/k/v biases, rotate-half rope
}


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf-models")
    return {name: save_byte_level_model(root / name, arch, seed=i, **overrides)
            for i, (name, (arch, overrides)) in enumerate(VARIANTS.items())}


def export_both(model, folder, pairs: str, *options):
    """The safetensors export and the f32 GGUF of the same plan."""
    edge = ("--allow-edge-layers",) if pairs.startswith("0") else ()
    st = folder / f"st-{pairs}"
    gg = folder / f"lp-{pairs}.gguf"
    for out, extra in ((st, ()), (gg, ("--gguf-type", "f32", *options))):
        result = invoke("export", model, "--pairs", pairs, "-o", out, *edge, *extra)
        assert result.exit_code == 0, result.output
    return st, gg


def transformers_logits(folder, ids: list[int]):
    model = resolve_model(str(folder)).load_model(dtype=torch.float32)
    with torch.no_grad():
        return model, model(torch.tensor([ids])).logits[0].numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def random_ids(vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pairs", ["2", "0,3"])  # a middle pair; block 0 wide (and another pair)
def test_llama_cpp_matches_transformers(variant, pairs, gguf_models, tmp_path):
    st, gg = export_both(gguf_models[variant], tmp_path, pairs)
    ids = random_ids(320)
    model, want = transformers_logits(st, ids)
    with open_gguf(gg, n_ctx=128, logits_all=True, n_threads=2) as llm:
        got = logits(llm, ids)
        assert relative_error(got, want) < TOLERANCE
        assert (got.argmax(-1) == want.argmax(-1)).all()
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
        assert greedy(llm, ids, 32) == out
    meta = gguf_metadata(gg)
    blocks = json.loads(meta["lpconvert.blocks"])
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [4 * len(b) for b in blocks]
    assert meta["deci.attention.head_count_kv"] == [2 * len(b) for b in blocks]
    assert meta["deci.feed_forward_length"] == [96 * len(b) for b in blocks]
    assert len(blocks) == 6 - len(pairs.split(","))


def test_no_pairs_is_the_source(gguf_models, tmp_path):
    """--pairs none: the source as a deci GGUF, the fair baseline; it computes what the source computes."""
    gg = tmp_path / "base.gguf"
    assert invoke("export", gguf_models["llama"], "--pairs", "none", "-o", gg, "--gguf-type", "f32").exit_code == 0
    ids = random_ids(320, seed=1)
    _, want = transformers_logits(gguf_models["llama"], ids)
    with open_gguf(gg, n_ctx=128, logits_all=True, n_threads=2) as llm:
        assert relative_error(logits(llm, ids), want) < TOLERANCE
    assert gguf_metadata(gg)["deci.block_count"] == 6


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-2), ("bf16", 5e-2), ("q8_0", 5e-2)])
def test_stored_types(gguf_type, tolerance, gguf_models, tmp_path):
    """Matrices in the chosen type, norms and biases in f32 (llama.cpp's own converter keeps them so)."""
    from gguf import GGMLQuantizationType, GGUFReader

    st = tmp_path / "st"
    gg = tmp_path / f"lp-{gguf_type}.gguf"
    assert invoke("export", gguf_models["llama-bias"], "--pairs", "2", "-o", st).exit_code == 0
    assert invoke("export", gguf_models["llama-bias"], "--pairs", "2", "-o", gg, "--gguf-type", gguf_type).exit_code == 0
    types = {t.name: t.tensor_type for t in GGUFReader(gg).tensors}
    wanted = GGMLQuantizationType[gguf_type.upper()]
    assert types["blk.2.attn_q.weight"] == wanted and types["token_embd.weight"] == wanted
    assert types["blk.2.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.2.attn_q.bias"] == GGMLQuantizationType.F32
    ids = random_ids(320, seed=2)
    _, want = transformers_logits(st, ids)
    with open_gguf(gg, n_ctx=128, logits_all=True, n_threads=2) as llm:
        assert relative_error(logits(llm, ids), want) < tolerance


def test_sliding_window_is_noted(tmp_path):
    """deci has no sliding window: the file declares the window as its context, and the user is told."""
    model = save_byte_level_model(tmp_path / "m", "mistral")  # sliding_window=8
    gg = tmp_path / "m.gguf"
    result = invoke("export", model, "--pairs", "2", "-o", gg)
    assert result.exit_code == 0, result.output
    assert "exact up to 8 tokens" in result.stderr
    assert gguf_metadata(gg)["deci.context_length"] == 8


@pytest.mark.slow
def test_smollm2_in_llama_cpp(smollm2_dir, tmp_path):
    """The real model: tokens, logits, greedy text and the chat template through llama.cpp."""
    from transformers import AutoTokenizer

    st, gg = export_both("smollm2-135m", tmp_path, "12,14,16")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "The capital of France is Paris. In 1889, 42 engineers finished the tower; it's 330 m tall."
    ids = tokenizer(text).input_ids
    model, want = transformers_logits(st, ids)
    with open_gguf(gg, n_ctx=256, logits_all=True, n_threads=2) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        got = logits(llm, ids)
        print(f"SmolLM2, llama.cpp against transformers: largest logit difference {relative_error(got, want):.1e} "
              "of the largest logit")  # the figure docs/gguf.md quotes (pytest -s)
        assert relative_error(got, want) < TOLERANCE
        assert (got.argmax(-1) == want.argmax(-1)).all()
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert greedy(llm, ids, 32) == out
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer(prompt).input_ids
        # the same greedy answer in both engines, ended by the template's end-of-turn token in both
        prompt_ids = torch.tensor([tokenizer(prompt).input_ids])
        answer = model.generate(prompt_ids, max_new_tokens=64, do_sample=False)[0, prompt_ids.shape[1]:]
        reply = llm.create_chat_completion(messages=messages, max_tokens=64, temperature=0)["choices"][0]
        assert reply["message"]["content"] == tokenizer.decode(answer, skip_special_tokens=True)
        assert (reply["finish_reason"] == "stop") == (answer[-1].item() == tokenizer.eos_token_id)


@pytest.mark.slow
def test_gguf_source_keeps_its_tokenizer(smollm2_gguf_source, tmp_path):
    """From a GGUF source, the tokenizer keys are copied unchanged (SmolLM's own pre-tokenizer kept)."""
    from lpconvert.export import plan_for_pairs
    from lpconvert.ggufexport import export_gguf
    from lpconvert.sources import smollm2_gguf

    gg = tmp_path / "from-gguf.gguf"
    export_gguf(smollm2_gguf_source, plan_for_pairs(smollm2_gguf_source, [12]), gg, gguf_type="q8_0")
    ours, theirs = gguf_metadata(gg), gguf_metadata(smollm2_gguf())
    assert ours["tokenizer.ggml.pre"] == theirs["tokenizer.ggml.pre"] == "smollm"
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    with open_gguf(gg, n_ctx=128, n_threads=2) as llm:
        text = "Digits 12345 split one by one."
        assert llm.tokenize(text.encode()) == _tokenize_with(smollm2_gguf(), text)


def _tokenize_with(path, text: str) -> list[int]:
    with open_gguf(path, n_ctx=64, n_threads=2) as llm:
        return llm.tokenize(text.encode())


# ----------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


def refused(tmp_path, *args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("arch, overrides, says", [
    ("qwen3", {}, "normalises q and k per head"),
    ("llama", {"hidden_act": "gelu"}, "SwiGLU"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 256}}, "rope scaling 'yarn'"),
])
def test_refused_architectures(arch, overrides, says, tmp_path):
    model = save_byte_level_model(tmp_path / "m", arch, **overrides)
    line = refused(tmp_path, "export", model, "--pairs", "2", "-o", tmp_path / "m.gguf")
    assert says in line and "safetensors" in line
    assert not (tmp_path / "m.gguf").exists()


def test_refused_tokenizer_and_options(tiny_models, gguf_models, tmp_path):
    out = tmp_path / "x.gguf"
    line = refused(tmp_path, "export", tiny_models["llama"], "--pairs", "2", "-o", out)  # Whitespace char-level BPE
    assert "byte-level BPE" in line
    assert "--dtype" in refused(tmp_path, "export", gguf_models["llama"], "--pairs", "2", "-o", out, "--dtype", "float16")
    assert "--gguf-type" in refused(tmp_path, "export", gguf_models["llama"], "--pairs", "2", "-o", tmp_path / "f",
                                    "--gguf-type", "q8_0")
    assert ".gguf" in refused(tmp_path, "export", gguf_models["llama"], "--pairs", "2", "-o", tmp_path / "f.bin",
                              "--format", "gguf")
    assert "q8_0" in refused(tmp_path, "export", gguf_models["llama"], "--pairs", "2", "-o", out, "--gguf-type", "q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_only_replaces_an_lpconvert_gguf(gguf_models, tmp_path):
    model = gguf_models["llama"]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF someone else's model")
    assert "already exists" in refused(tmp_path, "export", model, "--pairs", "2", "-o", out)
    assert "not written by lpconvert" in refused(tmp_path, "export", model, "--pairs", "2", "-o", out, "--overwrite")
    assert out.read_bytes() == b"GGUF someone else's model"
    out.unlink()
    assert invoke("export", model, "--pairs", "2", "-o", out).exit_code == 0
    assert invoke("export", model, "--pairs", "3", "-o", out, "--overwrite").exit_code == 0
    assert json.loads(gguf_metadata(out)["lpconvert.blocks"])[3] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_interrupted_gguf_export_leaves_nothing(signal_name, gguf_models, tmp_path):
    out = tmp_path / "out.gguf"
    script = slow_export_script(gguf_models["llama"], f"export_gguf(source, plan, {str(out)!r}, gguf_type='f32')")
    assert interrupt_while_writing(script, tmp_path, ".out.gguf.", signal_name) != 0
    assert list(tmp_path.iterdir()) == [], "an interrupted GGUF export left files behind"


def test_chat_template_of_the_tiny_tokenizer(gguf_models, tmp_path):
    gg = tmp_path / "chat.gguf"
    assert invoke("export", gguf_models["llama"], "--pairs", "2", "-o", gg).exit_code == 0
    meta = gguf_metadata(gg)
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.pre"] == "gpt-2"


def test_convert_recipe_writes_the_gguf_too(gguf_models, tiny_models, tmp_path):
    """export: {format: gguf} in a recipe: OUT holds model.gguf beside the folder export, same plan."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK_RECIPE + "export: {format: gguf, gguf_type: f32}\n")
    out = tmp_path / "out"
    result = invoke("convert", gguf_models["llama"], "-o", out, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "lpconvert-plan.json").read_text())
    ids = random_ids(320, seed=3)
    _, want = transformers_logits(out, ids)
    with open_gguf(out / "model.gguf", n_ctx=128, logits_all=True, n_threads=2) as llm:
        assert relative_error(logits(llm, ids), want) < TOLERANCE
    assert json.loads(gguf_metadata(out / "model.gguf")["lpconvert.plan"])["pairs"] == plan["pairs"]
    # a tokenizer the GGUF can't carry is refused before any stage runs
    line = refused(tmp_path, "convert", tiny_models["llama"], "-o", tmp_path / "out2", "--recipe", recipe)
    assert "byte-level BPE" in line and not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------------------
# eval and bench run a GGUF in llama.cpp

EVAL_QUICK = ("--text", "news", "--split", "all", "--tokens", "256", "--seq-len", "64", "--device", "cpu",
              "--dtype", "float32", "--json")


def test_eval_runs_a_gguf_in_llama_cpp(gguf_models, tmp_path):
    """The GGUF's quality, measured in llama.cpp, is the safetensors export's (llama.cpp's default f16
    KV cache costs a little), and a GGUF of another model is refused as a folder would be."""
    model = gguf_models["llama"]
    st, gg = export_both(model, tmp_path, "2")
    result = invoke("eval", model, gg, *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    in_llama = json.loads(result.stdout)
    in_transformers = json.loads(invoke("eval", model, st, *EVAL_QUICK).stdout)
    assert in_llama["converted_runs_in"] == "llama.cpp" and in_transformers["converted_runs_in"] == "transformers"
    assert in_llama["converted_depth"] == 5
    assert in_llama["perplexity_converted"] == pytest.approx(in_transformers["perplexity_converted"], rel=1e-3)
    assert in_llama["agreement"] >= in_transformers["agreement"] - 0.02
    assert in_llama["generation"]["converted"] == in_transformers["generation"]["converted"]
    line = refused(tmp_path, "eval", gguf_models["qwen2"], gg, *EVAL_QUICK)
    assert "converted from another model" in line
    assert "not a GGUF" in refused(tmp_path, "eval", model, gg, "--tasks", "core", "--limit", "2")
    assert "transformers cannot load" in refused(tmp_path, "inspect", gg)


def test_bench_times_two_ggufs(gguf_models, tmp_path):
    model = gguf_models["llama"]
    base, converted = tmp_path / "base.gguf", tmp_path / "lp.gguf"
    assert invoke("export", model, "--pairs", "none", "-o", base).exit_code == 0
    assert invoke("export", model, "--pairs", "2", "-o", converted).exit_code == 0
    quick = ("--prompt-len", "8", "--new-tokens", "16", "--warmup", "0", "--repeats", "2")
    result = invoke("bench", converted, "--baseline", base, *quick, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"].startswith("cpu (llama.cpp")
    assert {row["model"] for row in report["rows"]} == {"baseline", "model"}
    # no warm-up: the model's first call (llama.cpp allocating its buffers) is made when it loads, untimed
    assert all(0 < row["decode_tokens_per_s"] < 1e5 and row["prefill_tokens_per_s"] > 0 for row in report["rows"])
    assert report["speedups"][0]["decode"] > 0
    assert "across engines" in refused(tmp_path, "bench", converted, "--baseline", model, *quick)
    assert "one sequence at a time" in refused(tmp_path, "bench", converted, "--batch-size", "2", *quick)


def test_healed_gguf_matches_the_healed_folder(gguf_models, tmp_path):
    """--heal: a heal file's projections land in the GGUF as in the folder. Every healable tensor of
    both pairs is replaced (the fused q/k/v and gate/up rows too, as distill trains them), so the
    split and the rope permutation of healed rows are exercised."""
    from safetensors.torch import load_file

    from lpconvert.export import plan_for_pairs
    from lpconvert.healfile import EXPORT_PARTS, HEALED_PARTS, heal_header, tensor_name, write_heal_file

    model = gguf_models["llama-bias"]
    plain = tmp_path / "plain"
    assert invoke("export", model, "--pairs", "1,3", "-o", plain).exit_code == 0
    source = resolve_model(str(model))
    plan = plan_for_pairs(source, [1, 3])
    weights = load_file(plain / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    def fused(pair, part):  # the heal file's layout: the export's separate projections, rows concatenated
        prefix = tensor_name(plan, pair, part).partition("self_attn")[0].partition("mlp")[0]
        return torch.cat([weights[prefix + out] for out in EXPORT_PARTS[part]])

    healed = {tensor_name(plan, pair, part): fused(pair, part) * (1 + 0.2 * torch.randn(fused(pair, part).shape,
                                                                                         generator=g))
              for pair in plan.pairs for part in HEALED_PARTS}
    header = heal_header(source_name=source.name, fingerprint=plan.source, content_sha256=None, plan=plan,
                         method="distill", settings={}, calibration={}, heldout={}, pairs=[], perplexity={})
    heal = tmp_path / "heal.safetensors"
    write_heal_file(heal, healed, header)
    (tmp_path / "plan.json").write_text((plain / "lpconvert-plan.json").read_text())
    st, gg = tmp_path / "healed", tmp_path / "healed.gguf"
    for out, extra in ((st, ()), (gg, ("--gguf-type", "f32"))):
        result = invoke("export", model, "--plan", tmp_path / "plan.json", "--heal", heal, "-o", out, *extra)
        assert result.exit_code == 0, result.output
    ids = random_ids(320, seed=4)
    _, want = transformers_logits(st, ids)
    _, unhealed = transformers_logits(plain, ids)
    assert relative_error(unhealed, want) > 100 * TOLERANCE  # the heal changed the model
    with open_gguf(gg, n_ctx=128, logits_all=True, n_threads=2) as llm:
        assert relative_error(logits(llm, ids), want) < TOLERANCE
    assert json.loads(gguf_metadata(gg)["lpconvert.heal"])["tensors"] == sorted(healed)


def test_small_chunks_write_the_same_file(gguf_models, tmp_path, monkeypatch):
    """Streaming in chunks of a few rows (cut at part boundaries and whole heads) gives the very bytes
    that one chunk per tensor gives."""
    import lpconvert.blocks as blocks
    import lpconvert.ggufexport as ggufexport
    from lpconvert.export import plan_for_pairs

    source = resolve_model(str(gguf_models["llama-bias"]))
    plan = plan_for_pairs(source, [0, 2], allow_edge_layers=True)
    for name, chunk in (("large", 1 << 30), ("small", 200)):
        monkeypatch.setattr(blocks, "CHUNK_BYTES", chunk)
        monkeypatch.setattr(ggufexport, "CHUNK_BYTES", chunk)
        ggufexport.export_gguf(source, plan, tmp_path / f"{name}.gguf", gguf_type="q8_0")
    assert (tmp_path / "small.gguf").read_bytes() == (tmp_path / "large.gguf").read_bytes()


def test_rechunked_cuts_at_bounds_and_whole_heads():
    from lpconvert.ggufexport import _rechunked

    rows = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 2)
    chunks = [rows[:3], rows[3:11], rows[11:12], rows[12:40]]
    pieces = list(_rechunked(iter(chunks), [0, 16, 32, 40], {0: 4, 1: 4}, limit_rows=5))
    assert torch.equal(torch.cat([p for _, p in pieces]), rows)
    starts = 0
    for part, piece in pieces:
        assert [0, 16, 32, 40][part] <= starts and starts + piece.shape[0] <= [0, 16, 32, 40][part + 1]
        if part < 2:
            assert piece.shape[0] % 4 == 0
        starts += piece.shape[0]


def test_gguf_output_inside_the_source_is_refused(gguf_models, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(gguf_models["llama"], model)
    before = sorted(p.name for p in model.iterdir())
    assert "lies inside the source model" in refused(tmp_path, "export", model, "--pairs", "2", "-o", model / "lp.gguf")
    assert sorted(p.name for p in model.iterdir()) == before


# ----------------------------------------------------------------------------------------------
# An lpconvert export (fine-tuned with a LoRA merged in, or as written) to a GGUF: lpconvert export EXPORT -o x.gguf

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_merged(export, folder, seed: int = 0):
    """EXPORT with a random (non-zero) LoRA on every projection merged in and saved as a user does
    (merge_and_unload().save_pretrained), the export's tokenizer files copied beside it."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lpconvert.folders import TOKENIZER_FILES

    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                      init_lora_weights=False))
    lora.merge_and_unload().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (export / name).is_file():
            shutil.copy2(export / name, folder / name)
    return folder


@pytest.mark.parametrize("variant, pairs", [("llama", "2"), ("llama-bias", "0,3")])
def test_fine_tuned_export_to_gguf(variant, pairs, gguf_models, tmp_path):
    """A LoRA merged into an export with pairs: its GGUF computes in llama.cpp what the merged folder computes in
    transformers, names the folder as its source (not the model the export came from), and eval refuses to
    compare it with that model."""
    edge = ("--allow-edge-layers",) if pairs.startswith("0") else ()
    export = tmp_path / "lp"
    assert invoke("export", gguf_models[variant], "--pairs", pairs, "-o", export, *edge).exit_code == 0
    merged = lora_merged(export, tmp_path / "tuned")
    gg = tmp_path / "tuned.gguf"
    result = invoke("export", merged, "-o", gg, "--gguf-type", "f32")
    assert result.exit_code == 0, result.output
    ids = random_ids(320, seed=5)
    model, want = transformers_logits(merged, ids)
    _, untuned = transformers_logits(export, ids)
    assert relative_error(untuned, want) > 100 * TOLERANCE  # the LoRA changed the model
    with open_gguf(gg, n_ctx=128, logits_all=True, n_threads=2) as llm:
        got = logits(llm, ids)
        assert relative_error(got, want) < TOLERANCE
        assert (got.argmax(-1) == want.argmax(-1)).all()
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
        assert greedy(llm, ids, 16) == out
    meta = gguf_metadata(gg)
    blocks = json.loads(meta["lpconvert.blocks"])
    assert meta["deci.attention.head_count"] == [4 * len(b) for b in blocks] and len(blocks) == 6 - len(pairs.split(","))
    assert meta["lpconvert.source"] == str(merged) and "lpconvert.content_sha256" not in meta
    plan = json.loads(meta["lpconvert.plan"])
    assert plan["pairs"] == [] and plan["source"]["architecture"] == "lpconvert"
    lineage = json.loads(meta["lpconvert.export_of"])
    assert lineage["source"]["name"] == str(gguf_models[variant])
    assert [p[0] for p in lineage["plan"]["pairs"]] == [int(p) for p in pairs.split(",")]
    line = refused(tmp_path, "eval", gguf_models[variant], gg, *EVAL_QUICK)
    assert "converted from another model" in line and str(merged) in line
    result = invoke("eval", merged, gg, *EVAL_QUICK)  # the fine-tuned folder against its own GGUF
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["converted_runs_in"] == "llama.cpp"
    assert report["perplexity_converted"] == pytest.approx(report["perplexity_source"], rel=1e-3)


@pytest.mark.parametrize("variant", ["llama", "llama3-rope", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_export_to_gguf_is_the_source_to_gguf(variant, gguf_type, gguf_models, tmp_path):
    """An export as written, converted to a GGUF, holds the very tensors (names, types, shapes, bytes, in file
    order) and hyperparameters that exporting its source to a GGUF under the same pairs writes."""
    from gguf import GGUFReader

    model = gguf_models[variant]
    export, direct, via = tmp_path / "lp", tmp_path / "direct.gguf", tmp_path / "via.gguf"
    for args in (("--pairs", "1,3", "-o", export), ("--pairs", "1,3", "-o", direct, "--gguf-type", gguf_type)):
        assert invoke("export", model, *args).exit_code == 0
    result = invoke("export", export, "--pairs", "none", "-o", via, "--gguf-type", gguf_type)  # --pairs none: the same
    assert result.exit_code == 0, result.output
    a, b = GGUFReader(direct).tensors, GGUFReader(via).tensors
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a] == [(t.name, t.tensor_type, list(t.shape)) for t in b]
    for x, y in zip(a, b, strict=True):
        assert x.data.tobytes() == y.data.tobytes(), x.name
    ours, theirs = gguf_metadata(via), gguf_metadata(direct)
    kept = [k for k in theirs if not k.startswith(("lpconvert.", "general.name"))]
    assert {k: ours[k] for k in kept} == {k: theirs[k] for k in kept}
    assert ours["lpconvert.blocks"] == theirs["lpconvert.blocks"]


def test_gemma3_export_to_gguf_is_refused(tiny_models, tmp_path):
    """What no deci GGUF can hold is refused for an export as for its source, in the same words."""
    export = tmp_path / "lp"
    assert invoke("export", tiny_models["gemma3"], "--pairs", "2", "-o", export).exit_code == 0
    from_source = refused(tmp_path, "export", tiny_models["gemma3"], "--pairs", "2", "-o", tmp_path / "s.gguf")
    line = refused(tmp_path, "export", export, "-o", tmp_path / "g.gguf")
    assert "sandwich norms" in line and line.partition(" (")[0] == from_source.partition(" (")[0]
    assert "run the export as it is" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lp"]


def test_export_of_an_export_refusals(gguf_models, tmp_path):
    """An export is written to a GGUF as it is: a folder output, other pairs, a plan or a heal file are refused in
    one line, nothing written; a source still needs --pairs or --plan."""
    export = tmp_path / "lp"
    assert invoke("export", gguf_models["llama"], "--pairs", "2", "-o", export).exit_code == 0
    assert "not a source to export again as a folder" in refused(tmp_path, "export", export, "-o", tmp_path / "again")
    assert "not a source to export again" in refused(tmp_path, "export", export, "--pairs", "none", "-o",
                                                     tmp_path / "again")
    assert "--pairs cannot pair them again" in refused(tmp_path, "export", export, "--pairs", "1", "-o",
                                                       tmp_path / "x.gguf")
    assert "--plan cannot pair them again" in refused(tmp_path, "export", export, "--plan",
                                                      export / "lpconvert-plan.json", "-o", tmp_path / "x.gguf")
    assert "exactly one of --plan and --pairs" in refused(tmp_path, "export", gguf_models["llama"], "-o",
                                                          tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lp"]
