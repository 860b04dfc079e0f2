"""Builders of test inputs, shared by the test modules, conftest's fixtures and scripts/results/errors_table.py:
tiny random checkpoints of every supported architecture (and of GPT-2 and lpconvert's own model), tokenizers,
.bin and sharded checkpoints, hand-written scores files, a quick recipe, and exports made through the command
line (which must succeed: they are setup steps).

The tiny models have random norm weights and biases (not ones and zeros), so that folding norms
into projections and summing biases is really exercised.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

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
    # Local (sliding-window) layers 0-4 and a global layer 5, each type its own rotary base; an attention scalar
    # that is not head_dim; sandwich norms and q/k norms (random: see _randomise_norms_and_biases).
    "gemma3": ("Gemma3TextConfig", dict(
        sliding_window=4, query_pre_attn_scalar=12, tie_word_embeddings=True,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}


# ----------------------------------------------------------------------------------------------
# Tiny models and tokenizers


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_tiny_model(arch: str, seed: int = 0, **overrides):
    """ARCH's tiny random model; `overrides` replace fields of TINY and of ARCH's extras."""
    import transformers

    config_cls, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    return model.eval()


def make_tiny_tokenizer(vocab_size: int = 128, eos_token: str | None = None):
    """A character-level BPE tokenizer of `vocab_size` tokens, trained on the built-in news text; with
    `eos_token`, that special token too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lpconvert.texts import resolve_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>"] + ([eos_token] if eos_token else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator([resolve_text("news").text[:100_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token=eos_token)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_byte_level_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2's kind, which a GGUF carries) of `vocab_size` tokens trained on
    the built-in news text, with ChatML's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lpconvert.texts import resolve_text

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([resolve_text("news").text[:100_000]], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>")
    wrapped.chat_template = CHATML
    return wrapped


def save_byte_level_model(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """ARCH's tiny random model with a byte-level tokenizer of 320 tokens (what a GGUF export needs), in FOLDER."""
    tokenizer = make_byte_level_tokenizer(320)
    make_tiny_model(arch, seed=seed, vocab_size=320, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_seed(arch: str) -> int:
    """The seed save_tiny_models gives ARCH's model (its index in TINY_ARCHS)."""
    return list(TINY_ARCHS).index(arch)


def save_tiny_models(root: Path) -> dict[str, Path]:
    """ROOT/<arch>: each tiny random checkpoint saved with save_pretrained (safetensors), with a tokenizer."""
    tokenizer = make_tiny_tokenizer(TINY["vocab_size"])
    folders = {}
    for arch in TINY_ARCHS:
        folder = root / arch
        make_tiny_model(arch, seed=tiny_seed(arch)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[arch] = folder
    return folders


def save_other_vocabulary(folder: Path, vocab_size: int) -> Path:
    """A tiny Llama with its own tokenizer of VOCAB_SIZE tokens, saved in FOLDER."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": vocab_size})).save_pretrained(folder)
    make_tiny_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, num_layers: int = 4) -> Path:
    """A tiny GPT-2, an architecture lpconvert does not support, saved in FOLDER."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=num_layers, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    return folder


def save_lp_model(folder: Path, lp_blocks: list[list[int]], *, auto_map: bool = False) -> Path:
    """A random layer-parallel (lpconvert) model of the TINY shape with LP_BLOCKS, saved in FOLDER; with
    AUTO_MAP its config.json names the shipped code, as an export's does for remote-code users."""
    from lpconvert.modeling.configuration_lpconvert import LPConfig
    from lpconvert.modeling.modeling_lpconvert import LPForCausalLM

    fields = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}
    layers = sum(len(block) for block in lp_blocks)
    config = LPConfig(**fields, num_hidden_layers=layers, lp_blocks=lp_blocks, pad_token_id=None)
    torch.manual_seed(0)
    LPForCausalLM(config).eval().save_pretrained(folder)
    if auto_map:
        raw = json.loads((folder / "config.json").read_text())
        raw["auto_map"] = {"AutoConfig": "configuration_lpconvert.LPConfig",
                           "AutoModelForCausalLM": "modeling_lpconvert.LPForCausalLM"}
        (folder / "config.json").write_text(json.dumps(raw))
    return folder


# ----------------------------------------------------------------------------------------------
# Checkpoints in other layouts


def save_bin_folder(folder: Path, model) -> Path:
    """Save MODEL as config.json + one pytorch_model.bin state dict (a tied lm_head stored too)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def save_sharded_bin(model, folder: Path) -> dict[str, torch.Tensor]:
    """Save MODEL as a two-shard .bin checkpoint (config + pytorch_model.bin.index.json); return its state."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {n: t.clone() for n, t in model.state_dict().items()}  # clone: untie lm_head
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_sharded_safetensors(model_dir: Path, folder: Path, *, tokenizer: bool = False) -> Path:
    """The model of MODEL_DIR re-saved by transformers in 100 KB safetensors shards (with an index)."""
    import shutil

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(folder, max_shard_size="100KB")
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy(model_dir / name, folder / name)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder


# ----------------------------------------------------------------------------------------------
# Stage files: scores written by hand (the score stage is tested on its own)

# Tiny models have 6 layers: pair starts 0..4; without the edge layers only 1..3 (2 pairs at most).
REL_L2 = [0.9, 0.3, 0.2, 0.1, 0.8]
LOSS_INCREASE = [5.0, 0.04, 0.02, 0.03, 0.5]


def write_scores(path, model_dir, *, loss=True, rel_l2=REL_L2, loss_increase=LOSS_INCREASE, source=None):
    """A scores file at PATH for the model in MODEL_DIR (its fingerprint), with the given per-pair figures."""
    from lpconvert.formats import source_fingerprint
    from lpconvert.sources import resolve_model

    src = resolve_model(str(model_dir))
    base = 4.0
    pairs = []
    for i, value in enumerate(rel_l2):
        entry = {"first": i, "angular_distance": 0.1 + 0.05 * i, "pair_rel_l2": value, "pair_cosine": 1 - value}
        if loss:
            entry.update(loss=base * (1 + loss_increase[i]), perplexity=math.exp(base * (1 + loss_increase[i])),
                         loss_increase=loss_increase[i])
        pairs.append(entry)
    data = {
        "schema_version": 1, "kind": "lpconvert-scores",
        "source": source or source_fingerprint(src.config, src.store),
        "model": {"name": str(model_dir), "num_layers": 6},
        "calibration": {"source": "wiki", "kind": "builtin", "split": "calib", "seq_len": 32, "seed": 0,
                        "windows": 8, "tokens": 256},
        "base": {"loss": base, "perplexity": math.exp(base)},
        "layers": [{"layer": i, "angular_distance": 0.1} for i in range(6)],
        "pairs": pairs,
        "metrics": ["angular_distance", "pair_error"] + (["loss"] if loss else []),
        "created_by": "hand-written test scores",
    }
    path.write_text(json.dumps(data))
    return path


# A convert recipe that runs every stage in seconds on a tiny model (greedy plan from the scores alone).
QUICK_RECIPE = """
score: {calib: news, tokens: 256, seq_len: 64, device: cpu}
plan: {target: {pairs: 1}, strategy: greedy, use_model: false}
eval: {text: news, split: all, tokens: 256, seq_len: 64, device: cpu, new_tokens: 4}
"""


# ----------------------------------------------------------------------------------------------
# GGUF files edited by hand (the file's own layout kept: every other entry and the tensor data stay valid)

GGUF_ALIGNMENT = 32  # general.alignment's default, which ggufexport keeps


def _gguf_string_entry(key: str) -> bytes:
    """How a string entry starts in a GGUF header: the key (u64 length, bytes), then value type 8 (string)."""
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 8)


def rename_gguf_key(path: Path, key: str, new_key: str) -> None:
    """Rename the metadata entry KEY to NEW_KEY, of the same length (e.g. deci.vocab_size -> deci.vocab_sizX)."""
    assert len(new_key) == len(key)
    data = Path(path).read_bytes()
    old = struct.pack("<Q", len(key)) + key.encode()
    assert data.count(old) == 1, f"{key} is not in {path} once"
    Path(path).write_bytes(data.replace(old, struct.pack("<Q", len(new_key)) + new_key.encode()))


def set_gguf_string(path: Path, key: str, value: str) -> None:
    """Replace the string value of the metadata entry KEY with VALUE, padded with trailing spaces so that the
    header's length changes by whole alignment steps: the tensor data moves by as much and stays aligned."""
    data = Path(path).read_bytes()
    entry = _gguf_string_entry(key)
    assert data.count(entry) == 1, f"{key} is not a string entry of {path}"
    start = data.index(entry) + len(entry)
    (old_length,) = struct.unpack("<Q", data[start:start + 8])
    raw = value.encode()
    raw += b" " * ((old_length - len(raw)) % GGUF_ALIGNMENT)
    Path(path).write_bytes(data[:start] + struct.pack("<Q", len(raw)) + raw + data[start + 8 + old_length:])


def corrupt_gguf_tensor(path: Path, fill: bytes = b"\xff", tensor: str = "blk.0.ffn_down.weight") -> str:
    """Overwrite every data byte of TENSOR in the GGUF at PATH with FILL (repeated): 0xFF bytes are NaN in
    f32, f16 and bf16, and NaN scales in q8_0. Returns the tensor's name."""
    from gguf import GGUFReader

    found = {t.name: t for t in GGUFReader(path).tensors}
    assert tensor in found, f"{path} has no tensor {tensor} (it has {', '.join(found)})"
    offset, size = int(found[tensor].data_offset), int(found[tensor].n_bytes)
    del found  # the reader's memory map, closed before the file is written
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write((fill * (size // len(fill) + 1))[:size])
    return tensor


# ----------------------------------------------------------------------------------------------
# Interrupting a writer


def slow_export_script(model: Path, call: str) -> str:
    """Python that exports MODEL (pairs 1 and 3) with `call` (on `source` and `plan`), reading tiny pieces slowly,
    so that a signal lands while it writes."""
    return f"""
import time
import lpconvert.blocks as blocks
from lpconvert.export import export, plan_for_pairs, Path
from lpconvert.ggufexport import export_gguf
from lpconvert.sources import resolve_model
blocks.CHUNK_BYTES = 256  # many small pieces ...
source = resolve_model({str(model)!r})
real = source.store.read_rows
source.store.read_rows = lambda *a: (time.sleep(0.02), real(*a))[1]  # ... each slow to read
plan = plan_for_pairs(source, [1, 3])
{call}
"""


def interrupt_while_writing(script: str, folder: Path, temporary_prefix: str, signal_name: str) -> int:
    """Run SCRIPT, send it SIGNAL_NAME once a temporary entry named TEMPORARY_PREFIX... appears in FOLDER;
    return its exit code."""
    import signal
    import subprocess
    import sys
    import time

    # SIGINT reaches the child as Ctrl-C reaches a user's command (conftest.pytest_configure sees to that)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(p.name.startswith(temporary_prefix) for p in folder.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the export did not start writing"
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(getattr(signal, signal_name))
    proc.wait(timeout=60)
    return proc.returncode


# ----------------------------------------------------------------------------------------------
# The command line


def invoke(*args):
    """Run lpconvert ARGS (paths welcome) in-process, as a user would; stdout and stderr kept apart."""
    from typer.testing import CliRunner

    from lpconvert.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def cli_export(model, out: Path, *options, pairs: str = "2") -> Path:
    """`lpconvert export MODEL --pairs PAIRS -o OUT OPTIONS`, which must succeed (a setup step); return OUT."""
    result = invoke("export", model, "--pairs", pairs, "-o", out, *options)
    assert result.exit_code == 0, f"setup export failed (exit {result.exit_code}): {result.output}"
    return out


def export_plan(model, folder: Path, pairs: str = "2") -> dict:
    """The plan file an export of MODEL with PAIRS writes (the export itself is removed again)."""
    import shutil

    out = cli_export(model, folder / "plan-source-export", pairs=pairs)
    plan = json.loads((out / "lpconvert-plan.json").read_text())
    shutil.rmtree(out)
    return plan
