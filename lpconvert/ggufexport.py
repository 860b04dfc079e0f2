"""GGUF export: the layer-parallel model as one file that stock llama.cpp runs.

llama.cpp's `deci` architecture (written for Llama-3.1-Nemotron-51B) reads the head count, KV head
count and FFN width per layer, and builds each layer with its own sizes. A wide block is exactly a
pre-norm SwiGLU layer with twice the heads, KV heads and FFN width, so a layer-parallel model is a
`deci` model with no change to llama.cpp (docs/gguf.md).

The tensors are the export's own (blocks.all_output_tensors, built in float32 and rounded once to
the GGUF type), renamed and split the way llama.cpp's converter writes a Llama: the fused q/k/v
rows become attn_q, attn_k and attn_v, the q and k rows permuted per head for GGML's rope, and
gate_up becomes ffn_gate and ffn_up. They stream: the header (every tensor's name, shape and type)
is written first, then each tensor in row chunks of about 16 MB (blocks.CHUNK_BYTES), so memory
stays at a few chunks whatever the model size; the file is written beside OUT and renamed into place at the end.

An lpconvert export (fine-tuned or not: a LoRA merged into it, saved with save_pretrained) is written the same way
by `export_gguf_of_export`: its own tensors, copied, are the blocks, and the GGUF names the export as its source.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from . import __version__
from .archs import (
    ARCHITECTURES,
    LAYER_PREFIX,
    Architecture,
    config_size,
    layer_types_of,
    one_layer_value,
    rope_parameters_of,
)
from .archs import (
    block_widths as archs_block_widths,
)
from .blocks import CHUNK_BYTES, all_output_tensors, check_float_weights, copy_pieces
from .checkpoint import FileSlice, OutputTensor, TensorInfo
from .errors import LPError
from .export import ExportReport, checked_source, healed, one_torch_thread, refuse_nonfinite
from .formats import Plan, content_digest
from .formats import fingerprint as model_fingerprint
from .ggufvocab import check_vocabulary, write_vocabulary
from .healfile import HealFile
from .outputs import atomic_output_file, check_output_gguf, protected_paths, sigterm_as_interrupt
from .settings import GGUF_TYPES

GGUF_ARCH = "deci"
LP_KEY = "lpconvert"  # metadata keys lpconvert adds: lpconvert.version, .source, .plan, .blocks


# ----------------------------------------------------------------------------------------------
# Names: the export's tensors -> llama.cpp's


@dataclass(frozen=True)
class Part:
    """One llama.cpp tensor cut from the rows of an export tensor (rows in order, part after part)."""

    name: str  # inside the block: "attn_q" -> blk.N.attn_q.weight
    rows: str = "all"  # heads | kv_heads | ffn | all: whose width the part's row count is
    rope: bool = False  # rows permuted from Hugging Face's rotate-half order to GGML's interleaved pairs


# An export block's tensors (without .weight/.bias) -> the llama.cpp tensors they hold, in row order.
# A pair's q rows are [q_a, q_b]: the wide layer's heads (archs.py; the architectures with per-head q/k norms,
# whose heads alternate in units, are not exported to GGUF).
BLOCK_PARTS: dict[str, tuple[Part, ...]] = {
    "input_layernorm": (Part("attn_norm"),),
    "self_attn.q_proj": (Part("attn_q", "heads", rope=True),),
    "self_attn.k_proj": (Part("attn_k", "kv_heads", rope=True),),
    "self_attn.v_proj": (Part("attn_v", "kv_heads"),),
    "self_attn.o_proj": (Part("attn_output"),),
    "post_attention_layernorm": (Part("ffn_norm"),),
    "mlp.gate_proj": (Part("ffn_gate", "ffn"),),
    "mlp.up_proj": (Part("ffn_up", "ffn"),),
    "mlp.down_proj": (Part("ffn_down"),),
}
OUTER_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
LAYER_NAME_PREFIX = "model.layers."

# Rope scalings llama.cpp's deci graph applies as transformers does (others are refused).
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "swish")  # deci's FFN is SwiGLU


@dataclass(frozen=True)
class BlockWidths:
    heads: int
    kv_heads: int
    ffn: int


def block_widths(config, blocks: list[list[int]]) -> list[BlockWidths]:
    """Each block's head counts and FFN width (archs.block_widths: one source layer's times the layers it holds)."""
    return [BlockWidths(*widths) for widths in archs_block_widths(config, blocks)]


def head_dim_of(config) -> int:
    return config_size(config, "head_dim")  # the config's, or hidden_size // num_attention_heads


@dataclass
class GgufTensor:
    """One tensor of the GGUF file: rows [start, stop) of an export tensor, maybe rope-permuted."""

    name: str
    shape: tuple[int, ...]
    source: OutputTensor
    start: int
    stop: int
    rope_heads: int = 0  # >0: permute the rows of each of this many heads


def gguf_tensors(tensors: list[OutputTensor], config, blocks: list[list[int]]) -> list[GgufTensor]:
    """The GGUF file's tensors, in file order, each naming the rows of the export tensor it comes from."""
    widths = block_widths(config, blocks)
    head_dim = head_dim_of(config)
    out = []
    for tensor in tensors:
        shape = tuple(tensor.info.shape)
        if tensor.name in OUTER_NAMES:
            out.append(GgufTensor(OUTER_NAMES[tensor.name], shape, tensor, 0, shape[0]))
            continue
        block_text, _, rest = tensor.name.removeprefix(LAYER_NAME_PREFIX).partition(".")
        stem, _, suffix = rest.rpartition(".")
        if not tensor.name.startswith(LAYER_NAME_PREFIX) or stem not in BLOCK_PARTS:
            raise LPError(f"the export tensor {tensor.name} has no place in a llama.cpp deci model",
                          "export the safetensors format instead")
        block, width = int(block_text), widths[int(block_text)]
        start = 0
        for part in BLOCK_PARTS[stem]:
            rows = {"heads": width.heads * head_dim, "kv_heads": width.kv_heads * head_dim,
                    "ffn": width.ffn, "all": shape[0]}[part.rows]
            heads = (width.heads if part.rows == "heads" else width.kv_heads) if part.rope else 0
            out.append(GgufTensor(f"blk.{block}.{part.name}.{suffix}", (rows, *shape[1:]), tensor, start,
                                  start + rows, heads))
            start += rows
        if start != shape[0]:
            raise LPError(f"{tensor.name} has {shape[0]} rows, its llama.cpp parts {start}",
                          "the export's shapes disagree with config.json; re-download the source")
    return out


def rope_permuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rope pairs dimension i with i + d/2 of each head; GGML's pairs 2i with 2i + 1.

    Reordering each head's q (and k) rows maps one onto the other, and q.k is unchanged because
    q and k are reordered alike. The same permutation llama.cpp's converter applies to a Llama.
    """
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


# ----------------------------------------------------------------------------------------------
# What llama.cpp's deci graph can express


def gguf_unsupported(arch: Architecture, config) -> tuple[str, str] | None:
    """(why this model can't be a llama.cpp deci GGUF, what to do instead), or None when it can."""
    safetensors = "export the safetensors format (leave out --format gguf) and run it with transformers"
    if arch.norms.sandwich:  # before qk_norm: the post-norms are what no llama.cpp graph can do for a pair
        return (f"{arch.name} layers norm their attention and MLP outputs (sandwich norms): a pair must norm each "
                "branch before the sum, which llama.cpp's gemma3 graph cannot, and its deci graph has no such norms "
                "(an export with no pairs is the source itself: convert that with llama.cpp's convert_hf_to_gguf.py)",
                safetensors)
    if arch.qk_norm:
        return (f"{arch.name} normalises q and k per head, which llama.cpp's deci architecture has no "
                "tensors for", safetensors)
    act = getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        return f"activation '{act}': llama.cpp's deci architecture runs SwiGLU (silu) only", safetensors
    rope = rope_parameters_of(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return (f"rope scaling '{rope.get('rope_type')}' is not one llama.cpp's deci architecture applies "
                f"({', '.join(ROPE_TYPES)})", safetensors)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "rope covers part of each head (partial_rotary_factor); deci rotates whole heads", safetensors
    return None


def sliding_window_limit(config) -> int | None:
    """deci has no sliding window: a model that slides is exact up to its window, its context there."""
    if "sliding_attention" in layer_types_of(config) and getattr(config, "sliding_window", None):
        return int(config.sliding_window)
    return None


# ----------------------------------------------------------------------------------------------
# Metadata


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """rope_freqs for llama3-type scaling: llama.cpp divides each frequency by its factor."""
    base = float(rope["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < high_wavelen, 1.0,
                       np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def write_metadata(writer, config, blocks: list[list[int]], gguf_type: str, context_length: int) -> np.ndarray | None:
    """The deci hyperparameters (per-block widths as arrays); returns rope_freqs when the scaling needs it."""
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    widths = block_widths(config, blocks)
    head_dim = head_dim_of(config)
    writer.add_block_count(len(blocks))
    writer.add_context_length(context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length([w.ffn for w in widths])
    writer.add_head_count([w.heads for w in widths])
    writer.add_head_count_kv([w.kv_heads for w in widths])
    # deci would otherwise derive the head size from layer 0's head count, which a wide block 0 doubles
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    rope = rope_parameters_of(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("rope_type") == "llama3":
        return _llama3_rope_factors(rope, head_dim)
    return None


def _provenance(writer, source_name: str, plan: Plan, blocks: list[list[int]], heal: HealFile | None,
                content: str | None, export_of: dict | None = None) -> None:
    """What eval and bench read to check a GGUF against its source (llamacpp.open_exported_gguf). Written
    before everything else but general.architecture: ggufhead reads the entries before the tokenizer.

    A GGUF written from an export names the export as its source (lpconvert.source, and .plan: the export's
    fingerprint, no further pairs), as its weights may be fine-tuned and no longer the model it was exported from;
    it has no content_sha256 (`content` None), which eval cannot compute for an export. `export_of` is the export's
    own lineage (its config's lp_source and its plan), kept in lpconvert.export_of for the reader."""
    writer.add_name(f"{Path(source_name).name} layer-parallel ({len(blocks)} blocks)")
    writer.add_string(f"{LP_KEY}.version", __version__)
    writer.add_string(f"{LP_KEY}.source", source_name)
    if content is not None:
        writer.add_string(f"{LP_KEY}.content_sha256", content)  # formats.content_digest of the source
    writer.add_string(f"{LP_KEY}.plan", json.dumps(plan.to_json(), sort_keys=True))
    writer.add_string(f"{LP_KEY}.blocks", json.dumps(blocks))
    if heal is not None:
        writer.add_string(f"{LP_KEY}.heal", json.dumps(heal.summary(), sort_keys=True))
    if export_of is not None:
        writer.add_string(f"{LP_KEY}.export_of", json.dumps(export_of, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Tensor data


def storage_type(shape: tuple[int, ...], wanted: str):
    """The GGML type a tensor is stored in: norms and biases stay float32 (as llama.cpp's converter
    keeps them); a matrix whose rows don't split into q8_0's 32-value blocks falls back to f16."""
    if len(shape) < 2 or wanted == "f32":
        return T.F32
    if wanted == "q8_0" and shape[-1] % 32:
        return T.F16
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[wanted]


def stored_bytes(shape: tuple[int, ...], qtype) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encoded(rows: torch.Tensor, qtype) -> np.ndarray:
    """Float32 rows as the bytes of `qtype` (rounded to nearest even, as llama.cpp's converter does)."""
    if qtype == T.F32:
        return rows.numpy()
    if qtype == T.F16:
        return rows.to(torch.float16).numpy()
    if qtype == T.BF16:
        return rows.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(rows.numpy(), qtype)


# GGML type -> the name its range is given under, and the option that writes a wider type (None: none is wider)
RANGES = {T.F32: ("float32", None), T.BF16: ("bfloat16", None), T.F16: ("float16", "--gguf-type f32 or bf16"),
          T.Q8_0: ("q8_0", "--gguf-type f32 or bf16")}


def stored_values(data: np.ndarray, qtype) -> torch.Tensor:
    """The floats that `encoded` bytes hold: the values, or q8_0's block scales (its int8 codes are finite)."""
    if qtype == T.Q8_0:  # each block: a float16 scale, then 32 int8 codes
        return torch.from_numpy(data.reshape(-1, GGML_QUANT_SIZES[qtype][1])[:, :2].copy().view(np.float16))
    if qtype == T.BF16:
        return torch.from_numpy(data).view(torch.bfloat16)
    return torch.from_numpy(data)


def checked_encoding(rows: torch.Tensor, tensor: GgufTensor, qtype) -> np.ndarray:
    """`encoded`, refused when what it stores is not finite: a value past 65504 in f16, or past 127 x 65504
    in q8_0 (its float16 scale overflows), after the float32 values passed every check."""
    with np.errstate(over="ignore", invalid="ignore"):  # gguf-py's q8_0 scale cast warns; refused just below
        data = encoded(rows, qtype)
    refuse_nonfinite(stored_values(data, qtype), tensor.source, *RANGES[qtype])
    return data


def _float_rows(tensor: OutputTensor) -> Iterator[torch.Tensor]:
    """An export tensor's rows in order, in float32 chunks (as blocks.py builds them)."""
    shape = tuple(tensor.info.shape)
    for piece in tensor.build():
        if isinstance(piece, FileSlice):  # an unchanged float32 tensor: its bytes, read here
            data = np.fromfile(piece.path, dtype=np.float32, count=piece.length // 4, offset=piece.start)
            piece = torch.from_numpy(data)
        piece = piece.float()
        yield piece.reshape(-1, *shape[1:]) if len(shape) > 1 else piece.reshape(-1)


def _rechunked(chunks: Iterator[torch.Tensor], bounds: list[int], unit: dict[int, int],
               limit_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(part index, rows) for parts cut at `bounds` from a stream of row chunks, each piece a whole
    number of `unit[part]` rows (a head, for a part whose rows are permuted per head) and, unless a
    part ends sooner, at least `limit_rows` rows (about CHUNK_BYTES)."""
    part, pending, pending_rows, row = 0, [], 0, 0
    for chunk in chunks:
        offset = 0
        while offset < chunk.shape[0]:
            take = min(chunk.shape[0] - offset, bounds[part + 1] - row)
            pending.append(chunk[offset:offset + take])
            pending_rows += take
            offset += take
            row += take
            whole = pending_rows - pending_rows % unit.get(part, 1)
            if row == bounds[part + 1] or (whole and whole >= limit_rows):
                rows = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield part, rows[:whole] if row != bounds[part + 1] else rows
                rest = rows[whole:] if row != bounds[part + 1] else rows[:0]
                pending, pending_rows = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
                if row == bounds[part + 1]:
                    part += 1
                    if part == len(bounds) - 1:
                        return


def tensor_data(group: list[GgufTensor], head_dim: int) -> Iterator[tuple[GgufTensor, torch.Tensor]]:
    """(GGUF tensor, float32 rows ready to store) for the GGUF tensors cut from one export tensor."""
    bounds = [group[0].start] + [t.stop for t in group]
    unit = {i: head_dim for i, t in enumerate(group) if t.rope_heads}
    row_bytes = 4 * int(np.prod(group[0].shape[1:], dtype=np.int64))  # float32 rows
    limit_rows = max(1, CHUNK_BYTES // row_bytes)
    for index, rows in _rechunked(_float_rows(group[0].source), bounds, unit, limit_rows):
        tensor = group[index]
        if tensor.rope_heads:
            rows = rope_permuted(rows, rows.shape[0] // head_dim)
        yield tensor, rows


# ----------------------------------------------------------------------------------------------
# The stage


def check_gguf_exportable(arch: Architecture, config, fix: str | None = None) -> None:
    problem = gguf_unsupported(arch, config)
    if problem:
        raise LPError(problem[0], fix or problem[1])


def _check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise LPError(f"GGUF type '{gguf_type}' is not one of {', '.join(GGUF_TYPES)}", "pass e.g. --gguf-type f16")


def export_gguf(source, plan: Plan, out: Path, *, gguf_type: str = "f16", overwrite: bool = False,
                dry_run: bool = False, heal: HealFile | None = None,
                progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write `source` under `plan` as one llama.cpp GGUF file at `out` (atomically)."""
    started = time.perf_counter()
    _check_gguf_type(gguf_type)
    config, store = source.config, source.store
    arch, fingerprint = checked_source(source, plan)
    check_gguf_exportable(arch, config)
    tokenizer = check_vocabulary(source)
    blocks = plan.blocks()
    tensors = all_output_tensors(arch, config, store, blocks, torch.float32)  # rounded once, when stored
    content = content_digest(arch, store)
    if heal is not None:
        tensors = healed(tensors, heal, plan, fingerprint, content, torch.float32, arch, config)
    return _export(source, tensors, blocks, out, gguf_type=gguf_type, overwrite=overwrite, dry_run=dry_run,
                   progress=progress, started=started, tokenizer=tokenizer,
                   provenance=dict(plan=plan, heal=heal, content=content),
                   healed=heal.summary()["tensors"] if heal is not None else [])


# ----------------------------------------------------------------------------------------------
# An export (fine-tuned or not) as a GGUF


# What no deci GGUF can hold is refused for an export in its source's words (gguf_unsupported, for the architecture in
# config.json lp_source); the way out differs: an export is not exported again as safetensors, it already runs.
EXPORT_AS_IT_IS = "run the export as it is, with transformers or vLLM (trust_remote_code=True)"


def source_architecture_of_export(source) -> Architecture:
    """The architecture an lpconvert export was made from (config.json lp_source: its model_type, or its fingerprint's
    architecture in an export that did not record one). An export's own config is an LPConfig (model_type
    "lpconvert"), which archs.architecture_for does not know."""
    lp_source = getattr(source.config, "lp_source", None)
    lp_source = lp_source if isinstance(lp_source, dict) else {}
    recorded = (lp_source.get("fingerprint") or {}) if isinstance(lp_source.get("fingerprint"), dict) else {}
    model_type = lp_source.get("model_type") or recorded.get("architecture")
    if model_type not in ARCHITECTURES:
        raise LPError(f"{source.name} is an lpconvert export whose config.json names no source architecture lpconvert "
                      f"knows (lp_source model_type {model_type!r})",
                      "export the original model to a GGUF with its --plan instead")
    return ARCHITECTURES[model_type]


class _OneLayerConfig:
    """An export's config as formats.fingerprint reads a config: each width (num_attention_heads, ...) one
    layer's (archs.one_layer_value), which an LPConfig with per-block widths refuses to give as a global value."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name: str):
        return one_layer_value(self._config, name)


def export_fingerprint(source) -> dict:
    """The fingerprint of an export as a model of its own: its config (model_type "lpconvert", one entry per
    block) and its tensors' names and shapes."""
    return model_fingerprint(_OneLayerConfig(source.config), {name: info.shape for name, info in source.store.infos().items()})


def export_plan(source) -> dict:
    """The plan the export was made with: its lpconvert-plan.json when it has one that matches its blocks, else the
    one its config.json implies (a folder saved by save_pretrained, after a fine-tune, has no plan file)."""
    from .card import PLAN_FILE
    from .formats import plan_from_json

    config = source.config
    blocks = [list(b) for b in config.lp_blocks]
    lp_source = config.lp_source if isinstance(getattr(config, "lp_source", None), dict) else {}
    path = Path(source.path) / PLAN_FILE
    if path.is_file():
        try:
            plan = plan_from_json(json.loads(path.read_text()), path)
        except (LPError, ValueError, OSError):
            plan = None
        if plan is not None and plan.blocks() == blocks:
            return plan.to_json()
    pairs = [b[0] for b in blocks if len(b) > 1]
    source_print = lp_source.get("fingerprint") if isinstance(lp_source.get("fingerprint"), dict) else {
        "num_layers": sum(len(b) for b in blocks)}
    return Plan(source=source_print, pairs=pairs).to_json()


def export_gguf_of_export(source, out: Path, *, gguf_type: str = "f16", overwrite: bool = False,
                          dry_run: bool = False, progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write an lpconvert export (its config's lp_blocks, its own tensors copied) as the deci GGUF that exporting its
    source under its plan writes: the same tensors for an export left as written, a fine-tune's own after one.

    The GGUF's provenance is the export (lpconvert.source, and .plan: the export's fingerprint, its blocks as they
    are with no further pairs), and lpconvert.export_of keeps what the export was made from: eval and bench take
    the file for a conversion of the export, and refuse the original source, which a fine-tuned export no longer
    is. No content_sha256: eval computes none for an export (formats._content_of), and the one it hashes (final
    norm, first embedding rows) is what a LoRA on the projections leaves unchanged."""
    started = time.perf_counter()
    _check_gguf_type(gguf_type)
    config, store = source.config, source.store
    arch = source_architecture_of_export(source)
    check_gguf_exportable(arch, config, EXPORT_AS_IT_IS)
    check_float_weights(arch, store)
    tokenizer = check_vocabulary(source)
    blocks = [list(b) for b in config.lp_blocks]
    tensors = export_tensors(arch, source, len(blocks))
    plan = Plan(source=export_fingerprint(source), pairs=[])  # the export with no further pairs
    export_of = {"source": dict(config.lp_source) if isinstance(getattr(config, "lp_source", None), dict) else None,
                 "plan": export_plan(source)}
    return _export(source, tensors, blocks, out, gguf_type=gguf_type, overwrite=overwrite, dry_run=dry_run,
                   progress=progress, started=started, tokenizer=tokenizer,
                   provenance=dict(plan=plan, heal=None, content=None, export_of=export_of),
                   healed=[])


def export_tensors(arch: Architecture, source, num_blocks: int) -> list[OutputTensor]:
    """The export's tensors in the order the source path builds them (embeddings; each block's in the
    architecture's table order; final norm, head), each copied as float32 (its file bytes when it is float32)."""
    infos = source.store.infos()
    order = {rule.out: i for i, rule in enumerate(arch.rules)}
    by_block: list[list[str]] = [[] for _ in range(num_blocks)]
    outer = [w.name for w in (*arch.pre_weights, *arch.post_weights)]
    for name in infos:
        if name in outer or name.endswith(arch.ignored_suffixes):
            continue
        block_text, _, rest = name.removeprefix(LAYER_NAME_PREFIX).partition(".")
        if not (name.startswith(LAYER_NAME_PREFIX) and block_text.isdigit() and int(block_text) < num_blocks
                and rest in order):
            raise LPError(f"the export's tensor {name} has no place in a llama.cpp deci model", EXPORT_AS_IT_IS)
        by_block[int(block_text)].append(rest)
    names = [w.name for w in arch.pre_weights if w.name in infos]
    for block, rests in enumerate(by_block):
        names += [LAYER_PREFIX.format(block) + rest for rest in sorted(rests, key=order.__getitem__)]
    names += [w.name for w in arch.post_weights if w.name in infos]
    return [_copied(source.store, name) for name in names]


def _copied(store, name: str) -> OutputTensor:
    info = store.infos()[name]
    return OutputTensor(name, TensorInfo(info.shape, torch.float32),
                        lambda: copy_pieces(store, name, info, torch.float32))


# ----------------------------------------------------------------------------------------------
# Writing the file


def _export(source, tensors: list[OutputTensor], blocks: list[list[int]], out: Path, *, gguf_type: str,
            overwrite: bool, dry_run: bool, progress, started: float, tokenizer, provenance: dict,
            healed: list[str]) -> ExportReport:
    """TENSORS (an export's, float32) of BLOCKS (source layers each) written as the GGUF at OUT, atomically."""
    config = source.config
    layout = gguf_tensors(tensors, config, blocks)
    types = {t.name: storage_type(t.shape, gguf_type) for t in layout}
    total = sum(stored_bytes(t.shape, types[t.name]) for t in layout)
    window = sliding_window_limit(config)
    report = ExportReport(
        out=str(out), dry_run=dry_run, source=source.name, num_layers=sum(len(b) for b in blocks),
        effective_depth=len(blocks), pairs=[list(b) for b in blocks if len(b) > 1], blocks=blocks,
        dtype=gguf_type, healed=healed,
        shards=[{"file": Path(out).name, "tensors": len(layout), "bytes": total}], total_bytes=total,
        format="gguf",
        notes=[f"llama.cpp has no sliding window: exact up to {window} tokens, the context the file declares"]
        if window else [],
    )
    check_output_gguf(Path(out), overwrite, protected_paths(source))
    if dry_run:
        return report
    context = min(window, config.max_position_embeddings) if window else config.max_position_embeddings
    with sigterm_as_interrupt(), atomic_output_file(Path(out)) as tmp, one_torch_thread():
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        _provenance(writer, source.name, blocks=blocks, **provenance)
        rope_freqs = write_metadata(writer, config, blocks, gguf_type, context)
        write_vocabulary(writer, source, config.vocab_size, tokenizer)
        _write_tensors(writer, layout, types, total, rope_freqs, head_dim_of(config), progress)
        writer.close()
    report.seconds = time.perf_counter() - started
    return report


def _write_tensors(writer, layout: list[GgufTensor], types: dict, total: int, rope_freqs: np.ndarray | None,
                   head_dim: int, progress: Callable[[int, int], None] | None) -> None:
    """The header (metadata, then every tensor's name, shape and type), then each tensor's data in chunks."""
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, np.float32, rope_freqs.nbytes)
    for t in layout:
        writer.add_tensor_info(t.name, t.shape, np.float32, stored_bytes(t.shape, types[t.name]), raw_dtype=types[t.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    if rope_freqs is not None:
        _write_tensor(writer, f, [rope_freqs])
    written, index = 0, 0
    if progress:
        progress(0, total)
    while index < len(layout):  # the GGUF tensors cut from one export tensor are consecutive
        group = [layout[index]]
        while index + len(group) < len(layout) and layout[index + len(group)].source is group[0].source:
            group.append(layout[index + len(group)])
        data = tensor_data(group, head_dim)
        for tensor in group:
            planned = stored_bytes(tensor.shape, types[tensor.name])
            stored = _write_tensor(writer, f, (checked_encoding(rows, tensor, types[tensor.name])
                                               for rows in _take(data, tensor)))
            if stored != planned:
                raise RuntimeError(f"{tensor.name}: wrote {stored} bytes, planned {planned}")
            written += stored
            if progress:
                progress(written, total)
        index += len(group)

def _take(data: Iterator[tuple[GgufTensor, torch.Tensor]], tensor: GgufTensor) -> Iterator[torch.Tensor]:
    """The chunks of `data` that belong to `tensor` (they come in file order), stopping at its last row."""
    rows = 0
    while rows < tensor.stop - tensor.start:
        owner, chunk = next(data)
        if owner is not tensor:
            raise RuntimeError(f"rows of {owner.name} came while writing {tensor.name}")
        rows += chunk.shape[0]
        yield chunk


def _write_tensor(writer, f, chunks) -> int:
    """One tensor's data at the file's alignment, chunk by chunk; returns its byte count."""
    writer.write_padding(f, f.tell())
    size = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk)
        chunk.tofile(f)
        size += chunk.nbytes
    writer.write_padding(f, size)
    return size
