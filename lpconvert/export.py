"""Export: a source checkpoint + a plan -> a layer-parallel checkpoint that loads anywhere.

Each pair becomes one wide block (archs.py says how each tensor is combined), every other layer is
copied unchanged, and the model file that runs it (lpconvert/modeling/) is copied beside the weights.
Tensors are read one at a time and written straight into their shard: memory is bounded by one
output tensor, and everything goes to a temporary folder renamed to OUT only at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .archs import LAYER_PREFIX, Architecture, Rule, architecture_for
from .checkpoint import (
    FileSlice,
    MemoryStore,
    OutputTensor,
    TensorInfo,
    TensorStore,
    plan_shards,
    shard_file_names,
    write_index,
    write_shard,
)
from .errors import LPError
from .formats import Plan, check_fingerprint, source_fingerprint
from .outputs import atomic_output_dir, check_output_folder, protected_paths
from .runtime import dtype_from_name
from .settings import parse_size

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_lpconvert.py", "modeling_lpconvert.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lpconvert.LPConfig",
    "AutoModel": "modeling_lpconvert.LPModel",
    "AutoModelForCausalLM": "modeling_lpconvert.LPForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
PLAN_FILE = "lpconvert-plan.json"
# Non-weight buffers some old checkpoints saved; they are recomputed by the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(name: str, store: TensorStore) -> torch.dtype:
    if name == "auto":
        return store.main_dtype() or torch.float32
    return dtype_from_name(name, extra=("auto",))


# ----------------------------------------------------------------------------------------------
# Block tensors


class BlockBuilder:
    """Builds the output tensors of one block from its source layers, following the arch table."""

    def __init__(self, store: TensorStore, layers: list[int], dtype: torch.dtype):
        self.store = store
        self.layers = layers
        self.dtype = dtype

    def name(self, layer: int, part: str) -> str:
        return LAYER_PREFIX.format(layer) + part

    def info(self, layer: int, part: str) -> TensorInfo:
        name = self.name(layer, part)
        if name not in self.store.infos():
            raise LPError(f"the checkpoint has no tensor {name}", "the checkpoint is incomplete; re-download it")
        return self.store.infos()[name]

    def read(self, layer: int, part: str, check_finite: bool = False) -> torch.Tensor:
        tensor = self.store.read(self.name(layer, part))
        if check_finite:
            self._check_finite(tensor, layer, part)
        return tensor

    def row_chunks(self, layer: int, part: str) -> Iterator[torch.Tensor]:
        """The tensor in blocks of rows of about CHUNK_BYTES each, NaN/Inf-checked (pairs only)."""
        info = self.info(layer, part)
        for start, stop in row_blocks(info):
            chunk = self.store.read_rows(self.name(layer, part), start, stop)
            self._check_finite(chunk, layer, part)
            yield chunk

    def _check_finite(self, tensor: torch.Tensor, layer: int, part: str) -> None:
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise LPError(f"tensor {self.name(layer, part)} (layer {layer}) contains NaN or Inf",
                          "the source weights are corrupt; they cannot be combined into a pair")

    def unchanged(self, layer: int, part: str) -> Iterator[torch.Tensor | FileSlice]:
        """A tensor copied as it is: its file bytes when the dtype is kept, else cast block by block."""
        name = self.name(layer, part)
        yield from copy_pieces(self.store, name, self.info(layer, part), self.dtype)

    @property
    def paired(self) -> bool:
        return len(self.layers) > 1

    def shape(self, rule: Rule) -> tuple[int, ...]:
        first = self.info(self.layers[0], rule.parts[0]).shape
        h = len(self.layers)
        if rule.kind == "rows":
            rows = sum(self.info(layer, part).shape[0] for part in rule.parts for layer in self.layers)
            return (rows, *first[1:])
        if rule.kind == "cols":
            return (first[0], first[1] * h)
        if rule.kind == "stack":
            return (h, 1, first[-1])
        return first  # norm, sum

    def pieces(self, rule: Rule) -> Iterator[torch.Tensor | FileSlice]:
        """The output tensor's bytes in row-major order, in pieces of at most about CHUNK_BYTES."""
        if not self.paired:  # a copied layer: every tensor keeps its bytes (fused rows are consecutive)
            for part in rule.parts:
                yield from self.unchanged(self.layers[0], part)
            return
        if rule.kind == "norm":
            # A pair's norm weights are folded into the projections that read them: the norm itself is unit.
            yield torch.ones_like(self.read(self.layers[0], rule.parts[0]), dtype=self.dtype)
        elif rule.kind == "rows":
            for part in rule.parts:
                for layer in self.layers:
                    norm = self.read(layer, rule.fold, check_finite=True) if rule.fold else None
                    for chunk in self.row_chunks(layer, part):
                        yield fold_norm(chunk, norm, self.dtype) if norm is not None else chunk.to(self.dtype)
        elif rule.kind == "cols":
            # Row r of the output is [row r of a, row r of b]: built block of rows by block of rows.
            halves = [self.row_chunks(layer, rule.parts[0]) for layer in self.layers]
            for chunks in zip(*halves, strict=True):
                yield torch.cat([c.to(self.dtype) for c in chunks], dim=1)
        elif rule.kind == "sum":
            yield sum(self.read(layer, rule.parts[0], True).float() for layer in self.layers).to(self.dtype)
        elif rule.kind == "stack":
            yield torch.stack([self.read(layer, rule.parts[0], True) for layer in self.layers]).to(self.dtype)
        else:
            raise ValueError(f"unknown rule kind {rule.kind}")


# The unit of reading, folding and writing: bounds memory whatever the model size. 16 MB stays under
# glibc's largest mmap threshold (32 MB), so a freed chunk's memory is reused from the heap instead of
# coming back as fresh pages the kernel must fault in and zero: a 7B export with 64 MB chunks took
# 3.0M page faults, with 16 MB 0.8M (docs/benchmarks.md).
CHUNK_BYTES = 16 << 20


def row_blocks(info: TensorInfo) -> Iterator[tuple[int, int]]:
    rows = info.shape[0] if info.shape else 1
    row_bytes = max(1, info.nbytes // max(rows, 1))
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def copy_pieces(store: TensorStore, name: str, info: TensorInfo, dtype: torch.dtype
                ) -> Iterator[torch.Tensor | FileSlice]:
    """An unchanged tensor: its file bytes when the dtype is kept (copied in the kernel), else cast by blocks."""
    if info.dtype == dtype:
        piece = store.slice(name)
        if piece is not None:
            yield piece
            return
    for start, stop in row_blocks(info):
        block = store.read_rows(name, start, stop)
        yield block.to(dtype) if info.shape else block.reshape(info.shape).to(dtype)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Fold and concatenate on one thread while writing.

    The export's tensor work is memory-bound and small next to the kernel's page-cache copies of the
    writer thread; a second intra-op thread only spins between ops and takes the core the writer
    needs (7B export on 2 cores: 26 s of CPU instead of 33 s, docs/benchmarks.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fold_norm(matrix: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W diag(g) computed in float32 and rounded once to `dtype` (out of place: a float32 source tensor
    may be the caller's own memory).

    When W, g and the output share a 16-bit dtype, the product of two such values is exact in
    float32, and torch's 16-bit multiply computes in float32 and rounds once: the same bits 4x
    faster (tests/test_export.py checks the equality).
    """
    if matrix.dtype == norm.dtype == dtype and dtype in (torch.bfloat16, torch.float16):
        return matrix * norm[None, :]
    return (matrix.float() * norm.float()[None, :]).to(dtype)


def _all_finite(tensor: torch.Tensor) -> bool:
    # min and max are NaN when any element is, and +-inf when one is; 20x faster than isfinite().all()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def block_output_tensors(arch: Architecture, config, store: TensorStore, block: int, layers: list[int],
                         dtype: torch.dtype) -> list[OutputTensor]:
    builder = BlockBuilder(store, layers, dtype)
    tensors = []
    for rule in arch.active_rules(config):
        shape = builder.shape(rule)
        tensors.append(OutputTensor(
            name=LAYER_PREFIX.format(block) + rule.out,
            info=TensorInfo(tuple(shape), dtype),
            build=lambda rule=rule: builder.pieces(rule),
        ))
    return tensors


def _copied_tensor(store: TensorStore, name: str, dtype: torch.dtype) -> OutputTensor:
    info = store.infos()[name]
    target = dtype if info.dtype.is_floating_point else info.dtype
    return OutputTensor(name, TensorInfo(info.shape, target), lambda: copy_pieces(store, name, info, target))


# The dtypes whose values are the weights themselves. Integer and fp8 tensors are quantized codes
# whose meaning lives in scales elsewhere: folding a norm into them or copying them as weights
# writes a broken model (an int8 q_proj came out with all-zero rows).
FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_weights(store: TensorStore) -> None:
    for name, info in store.infos().items():
        if info.dtype not in FLOAT_WEIGHT_DTYPES and not name.endswith(IGNORED_SUFFIXES):
            dtype = str(info.dtype).removeprefix("torch.")
            raise LPError(f"tensor {name} is stored as {dtype}, not as floating-point weights (a quantized "
                          "checkpoint?); lpconvert folds norms only into float32/bfloat16/float16 weights",
                          "use the unquantized checkpoint of the model")


def check_layer_tensors(arch: Architecture, config, store: TensorStore, num_layers: int) -> None:
    """Refuse tensors the table does not know: silently dropping weights would corrupt the model."""
    known = {LAYER_PREFIX.format(layer) + part for layer in range(num_layers)
             for part in arch.layer_tensor_names(config)}
    for name in store.infos():
        if name.startswith("model.layers.") and name not in known and not name.endswith(IGNORED_SUFFIXES):
            raise LPError(f"tensor {name} is not part of a {arch.name} layer as lpconvert knows it",
                          "this checkpoint variant is not supported")


def check_config_matches_weights(config, store: TensorStore) -> None:
    """The shapes config.json promises must be the tensors' shapes (a config with missing fields gets
    transformers' defaults, e.g. hidden_size 4096, which would write a broken model)."""
    infos = store.infos()
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    expected = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        LAYER_PREFIX.format(0) + "self_attn.q_proj.weight": (heads * head_dim, config.hidden_size),
        LAYER_PREFIX.format(0) + "self_attn.k_proj.weight": (kv_heads * head_dim, config.hidden_size),
        LAYER_PREFIX.format(0) + "mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
    }
    for name, shape in expected.items():
        if name in infos and tuple(infos[name].shape) != shape:
            raise LPError(f"config.json does not match the weights: {name} is {tuple(infos[name].shape)} but the "
                          f"config implies {shape}", "use the config.json that came with these weights")
    last = LAYER_PREFIX.format(config.num_hidden_layers - 1) + "input_layernorm.weight"
    extra = LAYER_PREFIX.format(config.num_hidden_layers) + "input_layernorm.weight"
    if last not in infos or extra in infos:
        raise LPError(f"config.json does not match the weights: num_hidden_layers is {config.num_hidden_layers} but "
                      "the checkpoint holds a different number of layers", "use the config.json of these weights")


def all_output_tensors(arch: Architecture, config, store: TensorStore, blocks: list[list[int]],
                       dtype: torch.dtype) -> list[OutputTensor]:
    """Every tensor of the exported checkpoint, in file order: embeddings, blocks, final norm, head."""
    tensors = [_copied_tensor(store, "model.embed_tokens.weight", dtype)]
    for block, layers in enumerate(blocks):
        tensors += block_output_tensors(arch, config, store, block, layers, dtype)
    tensors.append(_copied_tensor(store, "model.norm.weight", dtype))
    if not getattr(config, "tie_word_embeddings", False):
        if "lm_head.weight" not in store.infos():
            raise LPError("the checkpoint has no lm_head.weight and its embeddings are not tied",
                          "the checkpoint is incomplete; re-download it")
        tensors.append(_copied_tensor(store, "lm_head.weight", dtype))
    return tensors


# ----------------------------------------------------------------------------------------------
# Config, card, side files


def layer_types_of(config) -> list[str]:
    """Attention type of each source layer (full or sliding window)."""
    num_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * num_layers


def block_layer_types(config, blocks: list[list[int]]) -> list[str]:
    types = layer_types_of(config)
    out = []
    for layers in blocks:
        kinds = {types[layer] for layer in layers}
        if len(kinds) > 1:
            a, b = layers
            raise LPError(f"layers {a} ({types[a]}) and {b} ({types[b]}) use different attention types",
                          "pair layers of the same attention type")
        out.append(kinds.pop())
    return out


_DROPPED_CONFIG_FIELDS = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                          "torch_dtype", "dtype", "layer_types", "num_hidden_layers", "use_sliding_window",
                          "max_window_layers", "rope_scaling", "rope_theta", "quantization_config",
                          "attention_bias", "mlp_bias", "_commit_hash")


def rope_parameters_of(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))  # transformers keeps "type" too
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def lp_config_dict(arch: Architecture, config, plan: Plan, dtype: torch.dtype, source_name: str) -> dict:
    blocks = plan.blocks()
    types = block_layer_types(config, blocks)
    base = {k: v for k, v in config.to_dict().items() if k not in _DROPPED_CONFIG_FIELDS}
    num_heads = config.num_attention_heads
    return {
        **base,
        "architectures": ["LPForCausalLM"],
        "model_type": "lpconvert",
        "auto_map": AUTO_MAP,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": num_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "hidden_act": getattr(config, "hidden_act", "silu"),
        "rope_parameters": rope_parameters_of(config),
        "sliding_window": getattr(config, "sliding_window", None) if "sliding_attention" in types else None,
        "layer_types": types,
        "lp_blocks": blocks,
        **arch.flags(config),
        "dtype": str(dtype).removeprefix("torch."),
        "lp_source": {
            "name": source_name,
            "model_type": config.model_type,
            "architecture": (getattr(config, "architectures", None) or [arch.hf_class])[0],
            "num_hidden_layers": config.num_hidden_layers,
            "fingerprint": plan.source,
        },
        "lpconvert_version": __version__,
    }


def model_card(source_name: str, plan: Plan, config: dict, hub_id: str | None = None,
               tokenizer_class: str | None = None) -> str:
    """The README of an export; `base_model` is the source's Hub id when known (the Hub links on it)."""
    pairs = ", ".join(f"({p}, {p + 1})" for p in plan.pairs) or "none"
    # AutoTokenizer reads config.json first, and its auto_map makes transformers ask before running
    # the folder's config code; the pinned tokenizer class loads without asking anything.
    plain_tokenizer = (f"\n# or, running no code from this folder: "
                       f"transformers.{tokenizer_class}.from_pretrained(\"PATH\")") if tokenizer_class else ""
    return f"""---
base_model: {json.dumps(hub_id or source_name)}
library_name: transformers
pipeline_tag: text-generation
tags:
- lpconvert
- layer-parallel
lpconvert:
  pairs: {json.dumps([[p, p + 1] for p in plan.pairs])}
  effective_depth: {plan.effective_depth}
  source_layers: {plan.num_layers}
  strategy: {json.dumps(plan.strategy)}
---

# Layer-parallel {source_name}

Converted by lpconvert {__version__} without retraining: {len(plan.pairs)} pairs of consecutive layers
run side by side, so the model runs {plan.effective_depth} blocks instead of {plan.num_layers}.

- Pairs (layer a, layer b): {pairs}
- Strategy: {plan.strategy}{f" (metric: {plan.metric})" if plan.metric else ""}
- Weights dtype: {config["dtype"]}

Each pair is one wide block computing

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

with the norm weights folded into the projections. The modeling code in this folder
(`modeling_lpconvert.py`) is the same file for every lpconvert export; it needs only torch and
transformers.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)  # config.json has auto_map{plain_tokenizer}
```

The plan that produced it is in `{PLAN_FILE}`.
"""


def resolved_tokenizer_class(source) -> str | None:
    """The class the source's tokenizer loads as, when it has a tokenizer_config.json to pin it in.

    Importing transformers costs about 1.6 s and reading a tokenizer about 0.5 s more: the export
    asks in a background thread (`Background`) while it streams the weights, which hides both.
    """
    if source.tokenizer_path is None or not (Path(source.tokenizer_path) / "tokenizer_config.json").is_file():
        return None
    return type(source.load_tokenizer()).__name__


class Background:
    """`work()` in a daemon thread. `result()` waits for it and returns (or raises) what it gave;
    `check()` raises at once if it has already failed, so a long export stops early."""

    def __init__(self, work: Callable[[], object]):
        self._outcome: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(work,), name="lpconvert-background", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            self._outcome["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            self._outcome["error"] = exc

    def check(self) -> None:
        if "error" in self._outcome:
            raise self._outcome["error"]

    def result(self):
        self._thread.join()
        self.check()
        return self._outcome["value"]


def write_generation_config(source, folder: Path) -> None:
    src = Path(source.path) / "generation_config.json"
    if src.is_file():
        shutil.copy2(src, folder / src.name)
        return
    # Rare (checkpoints ship one): derive it as save_pretrained would, at the cost of importing transformers.
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(source.config.to_dict()).save_pretrained(folder)


def copy_tokenizer(source, folder: Path, tokenizer_class: str | None) -> list[str]:
    if source.tokenizer_path is None:
        if source.kind != "gguf":
            return []
        # A GGUF carries its tokenizer inside; write it out in the usual files.
        before = set(folder.iterdir())
        source.load_tokenizer().save_pretrained(folder)
        return sorted(p.name for p in set(folder.iterdir()) - before)
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source.tokenizer_path) / name
        if path.is_file():
            shutil.copy2(path, folder / name)
            copied.append(name)
    _pin_tokenizer_class(folder, tokenizer_class)
    return copied


def _pin_tokenizer_class(folder: Path, resolved: str | None) -> None:
    """Name the tokenizer class the source resolves to in tokenizer_config.json.

    transformers picks a tokenizer class from config.json's model_type when it knows it; the
    export's model_type ("lpconvert") is unknown to it, so without this the same files could load
    as a different class than the source's (e.g. a generic backend instead of Qwen2Tokenizer).
    """
    config_path = folder / "tokenizer_config.json"
    if resolved is None or not config_path.is_file():
        return
    tokenizer_config = json.loads(config_path.read_text())
    if tokenizer_config.get("tokenizer_class") != resolved:
        tokenizer_config["tokenizer_class"] = resolved
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class ExportReport:
    out: str
    dry_run: bool
    source: str
    num_layers: int
    effective_depth: int
    pairs: list[list[int]]
    blocks: list[list[int]]
    dtype: str
    shards: list[dict]
    total_bytes: int
    seconds: float = 0.0
    tokenizer_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def export(source, plan: Plan, out: Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
           copy_tokenizer_files: bool = True, overwrite: bool = False, dry_run: bool = False,
           progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write the layer-parallel checkpoint of `source` under `plan` to `out` (atomically).

    `progress(bytes_written, total_bytes)` is called after each tensor.
    """
    started = time.perf_counter()
    config, store = source.config, source.store
    arch = architecture_for(config)
    check_fingerprint(plan.source, source_fingerprint(config, store), "the plan")
    check_config_matches_weights(config, store)
    check_float_weights(store)
    check_layer_tensors(arch, config, store, config.num_hidden_layers)
    target_dtype = resolve_dtype(dtype, store)
    blocks = plan.blocks()
    lp_config = lp_config_dict(arch, config, plan, target_dtype, source.name)
    tensors = all_output_tensors(arch, config, store, blocks, target_dtype)
    shards = plan_shards(tensors, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    report = ExportReport(
        out=str(out), dry_run=dry_run, source=source.name, num_layers=plan.num_layers,
        effective_depth=plan.effective_depth, pairs=[[p, p + 1] for p in plan.pairs], blocks=blocks,
        dtype=lp_config["dtype"],
        shards=[{"file": n, "tensors": len(s), "bytes": sum(t.info.nbytes for t in s)} for n, s in zip(names, shards, strict=False)],
        total_bytes=sum(t.info.nbytes for t in tensors),
    )
    protect = protected_paths(source)
    if dry_run:
        check_output_folder(Path(out), overwrite, protect)
        return report

    tokenizer_class = Background(lambda: resolved_tokenizer_class(source)) if copy_tokenizer_files else None
    metadata = {"format": "pt", "producer": "lpconvert", "lpconvert_version": __version__}
    written = 0

    def on_tensor(tensor: OutputTensor) -> None:
        nonlocal written
        if tokenizer_class:
            tokenizer_class.check()  # a broken tokenizer stops the export now, not after the last shard
        written += tensor.info.nbytes
        if progress:
            progress(written, report.total_bytes)

    if progress:
        progress(0, report.total_bytes)
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp, one_torch_thread():
        for shard, name in zip(shards, names, strict=True):
            write_shard(tmp / name, shard, metadata, on_tensor=on_tensor)
        if len(shards) > 1:
            write_index(tmp, shards, names, {"producer": "lpconvert"})
        (tmp / "config.json").write_text(json.dumps(lp_config, indent=2, sort_keys=True) + "\n")
        for file in MODELING_FILES:
            shutil.copy2(MODELING_DIR / file, tmp / file)
        pinned = tokenizer_class.result() if tokenizer_class else None
        if tokenizer_class:
            report.tokenizer_files = copy_tokenizer(source, tmp, pinned)
        write_generation_config(source, tmp)
        plan.save(tmp / PLAN_FILE)
        (tmp / "README.md").write_text(model_card(source.name, plan, lp_config, getattr(source, "hub_id", None),
                                                  pinned))
    report.seconds = time.perf_counter() - started
    return report


def plan_for_pairs(source, pairs: list[int], allow_edge_layers: bool = False) -> Plan:
    """A manual plan (`--pairs`) for this source."""
    from .formats import validate_pairs

    config = source.config
    ordered = validate_pairs(pairs, config.num_hidden_layers, allow_edge_layers)
    return Plan(source=source_fingerprint(config, source.store), pairs=ordered, strategy="manual")


def convert_in_memory(model, pairs: list[int], *, dtype: torch.dtype | None = None, name: str = "in-memory"):
    """The layer-parallel model of a loaded transformers model, built without touching disk.

    Same tensors as `export` writes (same table, same folding), loaded into lpconvert's own copy of
    the shipped modeling file. Used to benchmark random-weight models built on a GPU.
    """
    from .formats import validate_pairs
    from .modeling.configuration_lpconvert import LPConfig
    from .modeling.modeling_lpconvert import LPForCausalLM

    config = model.config
    store = MemoryStore({k: v.detach() for k, v in model.state_dict().items()})
    arch = architecture_for(config)
    plan = Plan(source=source_fingerprint(config, store),
                pairs=validate_pairs(pairs, config.num_hidden_layers, allow_edge_layers=True))
    dtype = dtype or store.main_dtype() or torch.float32
    lp_config = LPConfig.from_dict(lp_config_dict(arch, config, plan, dtype, name))
    lp_config._attn_implementation = config._attn_implementation
    device = next(model.parameters()).device
    state = {t.name: torch.cat([p.reshape(-1) for p in t.build()]).view(t.info.shape)
             for t in all_output_tensors(arch, config, store, plan.blocks(), dtype)}
    with torch.device(device):
        lp_model = LPForCausalLM(lp_config).to(dtype)
    missing, unexpected = lp_model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"in-memory conversion mismatch: missing {missing}, unexpected {unexpected}")
    if getattr(lp_config, "tie_word_embeddings", False):
        lp_model.lm_head.weight = lp_model.model.embed_tokens.weight
    return lp_model.eval()
