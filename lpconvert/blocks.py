"""How each block of the exported model is built from the source's tensors.

Each pair of layers becomes one wide block, every other layer is copied unchanged, following the
architecture's table (archs.py; docs/method.md section 2). Output tensors are built piece by piece
from blocks of rows, so memory stays bounded by about CHUNK_BYTES whatever the model size. Also
here: the checks the source tensors must pass first, and `convert_in_memory`. The ground under
`export` (which writes the tensors to disk) and `bench` (which converts a random model on a GPU
without disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .archs import LAYER_PREFIX, Architecture, Rule, Weight, architecture_for
from .card import lp_config_dict
from .checkpoint import FileSlice, MemoryStore, OutputTensor, TensorInfo, TensorStore
from .errors import LPError
from .formats import Plan, source_fingerprint

Piece = torch.Tensor | FileSlice

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


def copy_pieces(store: TensorStore, name: str, info: TensorInfo, dtype: torch.dtype) -> Iterator[Piece]:
    """An unchanged tensor: its file bytes when the dtype is kept (copied in the kernel), else cast by blocks."""
    if info.dtype == dtype:
        piece = store.slice(name)
        if piece is not None:
            yield piece
            return
    for start, stop in row_blocks(info):
        block = store.read_rows(name, start, stop)
        yield block.to(dtype) if info.shape else block.reshape(info.shape).to(dtype)


def fold_norm(matrix: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    """W diag(offset + g) computed in float32 and rounded once to `dtype` (out of place: a float32 source
    tensor may be the caller's own memory). Gemma's norms scale by 1 + g (offset 1).

    When W, g and the output share a 16-bit dtype, the product of two such values is exact in
    float32, and torch's 16-bit multiply computes in float32 and rounds once: the same bits 4x
    faster (tests/test_export.py checks the equality).
    """
    if not offset and matrix.dtype == norm.dtype == dtype and dtype in (torch.bfloat16, torch.float16):
        return matrix * norm[None, :]
    return (matrix.float() * (offset + norm.float())[None, :]).to(dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    # min and max are NaN when any element is, and +-inf when one is; 20x faster than isfinite().all()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


# ----------------------------------------------------------------------------------------------
# Block tensors


class BlockBuilder:
    """Builds the output tensors of one block from its source layers, following the arch table."""

    def __init__(self, store: TensorStore, layers: list[int], dtype: torch.dtype, prefix: str = LAYER_PREFIX,
                 head_units: int = 1, norm_offset: float = 0.0):
        self.store = store
        self.norm_offset = norm_offset  # a norm scales by norm_offset + weight (archs.Architecture.norm_offset)
        self.layers = layers
        self.dtype = dtype
        self.prefix = prefix  # of a source layer's tensors
        self.head_units = head_units  # a pair's heads alternate in this many units per half (Rule.heads)

    def name(self, layer: int, part: str) -> str:
        return self.prefix.format(layer) + part

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

    def row_chunks(self, layer: int, part: str, unit: int = 0, units: int = 1) -> Iterator[torch.Tensor]:
        """The tensor (or the unit-th of `units` equal row ranges of it) in blocks of rows of about CHUNK_BYTES
        each, NaN/Inf-checked (pairs only)."""
        info = self.info(layer, part)
        rows = info.shape[0] // units
        for start, stop in row_blocks(TensorInfo((rows, *info.shape[1:]), info.dtype)):
            chunk = self.store.read_rows(self.name(layer, part), unit * rows + start, unit * rows + stop)
            self._check_finite(chunk, layer, part)
            yield chunk

    def _check_finite(self, tensor: torch.Tensor, layer: int, part: str) -> None:
        if tensor.is_floating_point() and not all_finite(tensor):
            raise LPError(f"tensor {self.name(layer, part)} (layer {layer}) contains NaN or Inf",
                          "the source weights are corrupt; they cannot be combined into a pair")

    def unchanged(self, layer: int, part: str) -> Iterator[Piece]:
        """A tensor copied as it is: its file bytes when the dtype is kept, else cast block by block."""
        name = self.name(layer, part)
        yield from copy_pieces(self.store, name, self.info(layer, part), self.dtype)

    @property
    def paired(self) -> bool:
        return len(self.layers) > 1

    def first_shape(self, rule: Rule) -> tuple[int, ...]:
        return self.info(self.layers[0], rule.parts[0]).shape

    def shape(self, rule: Rule) -> tuple[int, ...]:
        return kind_of(rule).shape(self, rule)

    def pieces(self, rule: Rule) -> Iterator[Piece]:
        """The output tensor's bytes in row-major order, in pieces of at most about CHUNK_BYTES."""
        if not self.paired:  # a copied layer: every tensor keeps its bytes (fused rows are consecutive)
            for part in rule.parts:
                yield from self.unchanged(self.layers[0], part)
            return
        yield from kind_of(rule).pair_pieces(self, rule)


@dataclass(frozen=True)
class Kind:
    """What a rule kind (archs.Rule.kind) builds: the output shape (for one layer or a pair), and the
    output pieces of a pair (a copied layer keeps its tensors' bytes, whatever the kind)."""

    shape: Callable[[BlockBuilder, Rule], tuple[int, ...]]
    pair_pieces: Callable[[BlockBuilder, Rule], Iterator[Piece]]


def _rows_shape(b: BlockBuilder, rule: Rule) -> tuple[int, ...]:
    first = b.first_shape(rule)
    return (sum(b.info(layer, part).shape[0] for part in rule.parts for layer in b.layers), *first[1:])


def _units(b: BlockBuilder, rule: Rule) -> int:
    return b.head_units if rule.heads else 1


def _rows(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    norms = {layer: b.read(layer, rule.fold, check_finite=True) for layer in b.layers} if rule.fold else {}
    units = _units(b, rule)
    for part in rule.parts:
        for unit in range(units):
            for layer in b.layers:
                for chunk in b.row_chunks(layer, part, unit, units):
                    yield fold_norm(chunk, norms[layer], b.dtype, b.norm_offset) if norms else chunk.to(b.dtype)


def _cols_shape(b: BlockBuilder, rule: Rule) -> tuple[int, ...]:
    first = b.first_shape(rule)
    return (first[0], first[1] * len(b.layers))


def _cols(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    # Row r of the output is [row r of a, row r of b] (unit by unit for heads): built block of rows by block of rows.
    units = _units(b, rule)
    halves = [b.row_chunks(layer, rule.parts[0]) for layer in b.layers]
    for chunks in zip(*halves, strict=True):
        cut = [c.to(b.dtype).chunk(units, dim=1) for c in chunks]
        yield torch.cat([half[unit] for unit in range(units) for half in cut], dim=1)


def unit_order(tensor: torch.Tensor, units: int, dim: int) -> torch.Tensor:
    """A pair tensor in natural order along `dim` ([a, b]) put in unit order (a's unit 0, b's unit 0, a's unit 1,
    ...), as `_rows` and `_cols` build heads rules: for a heal file's tensors, which keep the natural order."""
    moved = tensor.movedim(dim, 0)
    reordered = moved.reshape(2, units, -1, *moved.shape[1:]).transpose(0, 1).reshape(moved.shape)
    return reordered.movedim(0, dim).contiguous()


def _unit_norm(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    # A pair's norm weights are folded into the projections that read them: the norm itself is unit
    # (weight 1, or 0 where a norm scales by 1 + weight).
    yield torch.full_like(b.read(b.layers[0], rule.parts[0]), 1.0 - b.norm_offset, dtype=b.dtype)


def _sum(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    yield sum(b.read(layer, rule.parts[0], True).float() for layer in b.layers).to(b.dtype)


def _stack(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    yield torch.stack([b.read(layer, rule.parts[0], True) for layer in b.layers]).to(b.dtype)


def _branches(b: BlockBuilder, rule: Rule) -> Iterator[Piece]:
    # Branch after branch, each layer's tensor whole: a's rows, then b's (a [2, *shape] tensor in row-major order).
    for layer in b.layers:
        for chunk in b.row_chunks(layer, rule.parts[0]):
            yield chunk.to(b.dtype)


# Rule kind -> how it is built (archs.py says what each kind means): a new kind is one entry here.
KINDS: dict[str, Kind] = {
    "norm": Kind(BlockBuilder.first_shape, _unit_norm),
    "rows": Kind(_rows_shape, _rows),
    "cols": Kind(_cols_shape, _cols),
    "sum": Kind(BlockBuilder.first_shape, _sum),
    "stack": Kind(lambda b, rule: (len(b.layers), 1, b.first_shape(rule)[-1]), _stack),
    "branches": Kind(lambda b, rule: (2, *b.first_shape(rule)) if b.paired else b.first_shape(rule), _branches),
}


def kind_of(rule: Rule) -> Kind:
    if rule.kind not in KINDS:
        raise ValueError(f"unknown rule kind {rule.kind}")
    return KINDS[rule.kind]


def block_output_tensors(arch: Architecture, config, store: TensorStore, block: int, layers: list[int],
                         dtype: torch.dtype) -> list[OutputTensor]:
    builder = BlockBuilder(store, layers, dtype, arch.layer_prefix, arch.head_units(config), arch.norm_offset)
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


def _outer_tensors(weights: tuple[Weight, ...], config, store: TensorStore, dtype: torch.dtype
                   ) -> list[OutputTensor]:
    """The tensors outside the layers (copied); a tied one is left out, the model reuses its twin."""
    tensors = []
    for weight in weights:
        if weight.tied_to and getattr(config, "tie_word_embeddings", False):
            continue
        if weight.tied_to and weight.name not in store.infos():
            raise LPError(f"the checkpoint has no {weight.name} and its embeddings are not tied",
                          "the checkpoint is incomplete; re-download it")
        if weight.name not in store.infos():
            raise LPError(f"the checkpoint has no tensor {weight.name}", "the checkpoint is incomplete; re-download it")
        tensors.append(_copied_tensor(store, weight.name, dtype))
    return tensors


def all_output_tensors(arch: Architecture, config, store: TensorStore, blocks: list[list[int]],
                       dtype: torch.dtype) -> list[OutputTensor]:
    """Every tensor of the exported checkpoint, in file order: embeddings, blocks, final norm, head."""
    tensors = _outer_tensors(arch.pre_weights, config, store, dtype)
    for block, layers in enumerate(blocks):
        tensors += block_output_tensors(arch, config, store, block, layers, dtype)
    return tensors + _outer_tensors(arch.post_weights, config, store, dtype)


# ----------------------------------------------------------------------------------------------
# Checks on the source tensors, before anything is built


# The dtypes whose values are the weights themselves. Integer and fp8 tensors are quantized codes
# whose meaning lives in scales elsewhere: folding a norm into them or copying them as weights
# writes a broken model (an int8 q_proj came out with all-zero rows).
FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_weights(arch: Architecture, store: TensorStore) -> None:
    for name, info in store.infos().items():
        if info.dtype not in FLOAT_WEIGHT_DTYPES and not name.endswith(arch.ignored_suffixes):
            dtype = str(info.dtype).removeprefix("torch.")
            raise LPError(f"tensor {name} is stored as {dtype}, not as floating-point weights (a quantized "
                          "checkpoint?); lpconvert folds norms only into float32/bfloat16/float16 weights",
                          "use the unquantized checkpoint of the model")


def check_layer_tensors(arch: Architecture, config, store: TensorStore, num_layers: int) -> None:
    """Refuse tensors the table does not know: silently dropping weights would corrupt the model."""
    known = {arch.layer_prefix.format(layer) + part for layer in range(num_layers)
             for part in arch.layer_tensor_names(config)}
    layers = arch.layer_prefix.partition("{")[0]  # "model.layers."
    for name in store.infos():
        if name.startswith(layers) and name not in known and not name.endswith(arch.ignored_suffixes):
            raise LPError(f"tensor {name} is not part of a {arch.name} layer as lpconvert knows it",
                          "this checkpoint variant is not supported")


def check_config_matches_weights(arch: Architecture, config, store: TensorStore) -> None:
    """The shapes config.json promises (the table's `shapes`) must be the tensors' shapes, and its
    num_hidden_layers the number of layers the checkpoint holds."""
    infos = store.infos()
    for name, shape in arch.expected_shapes(config).items():
        if name in infos and tuple(infos[name].shape) != shape:
            raise LPError(f"config.json does not match the weights: {name} is {tuple(infos[name].shape)} but the "
                          f"config implies {shape}", "use the config.json that came with these weights")
    last = arch.layer_prefix.format(config.num_hidden_layers - 1) + arch.layer_marker
    extra = arch.layer_prefix.format(config.num_hidden_layers) + arch.layer_marker
    if last not in infos or extra in infos:
        raise LPError(f"config.json does not match the weights: num_hidden_layers is {config.num_hidden_layers} but "
                      "the checkpoint holds a different number of layers", "use the config.json of these weights")


# ----------------------------------------------------------------------------------------------
# In memory


def convert_in_memory(model, pairs: list[int], *, dtype: torch.dtype | None = None, name: str = "in-memory"):
    """The layer-parallel model of a loaded transformers model, built without touching disk.

    Same tensors as `export` writes (same table, same folding), loaded into lpconvert's own copy of
    the shipped modeling file. Used to benchmark random-weight models built on a GPU.
    """
    from .archs import unpairable_starts
    from .formats import validate_pairs
    from .modeling.configuration_lpconvert import LPConfig
    from .modeling.modeling_lpconvert import LPForCausalLM

    config = model.config
    store = MemoryStore({k: v.detach() for k, v in model.state_dict().items()})
    arch = architecture_for(config)
    plan = Plan(source=source_fingerprint(config, store),
                pairs=validate_pairs(pairs, config.num_hidden_layers, allow_edge_layers=True,
                                     unpairable=unpairable_starts(config)))
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
