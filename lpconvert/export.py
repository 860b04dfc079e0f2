"""Export: a source checkpoint + a plan -> a layer-parallel checkpoint that loads anywhere.

The stage that writes the folder: the tensors of every block (built as blocks.py says, from the
architecture's table), config.json and the model card (card.py), the model file that runs it
(lpconvert/modeling/), the tokenizer and generation config, and the plan. Tensors are read one at
a time and written straight into their shard: memory is bounded by one output tensor, and
everything goes to a temporary folder renamed to OUT only at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .archs import LAYER_PREFIX, Architecture, architecture_for
from .blocks import (
    all_finite,
    all_output_tensors,
    check_config_matches_weights,
    check_float_weights,
    check_layer_tensors,
    unit_order,
)
from .card import MODELING_DIR, MODELING_FILES, PLAN_FILE, lp_config_dict, model_card, shipped_files
from .checkpoint import (
    FileSlice,
    OutputTensor,
    TensorStore,
    plan_shards,
    shard_file_names,
    write_index,
    write_shard,
)
from .errors import LPError
from .folders import TOKENIZER_FILES
from .formats import Plan, check_fingerprint, content_digest, plan_for_source, source_fingerprint
from .healfile import EXPORT_PARTS, HealFile, block_of_pair, check_heal_for, checked_tensor, tensor_name
from .outputs import atomic_output_dir, check_output_folder, protected_paths
from .runtime import dtype_from_name
from .settings import parse_size


def resolve_dtype(name: str, store: TensorStore) -> torch.dtype:
    if name == "auto":
        return store.main_dtype() or torch.float32
    return dtype_from_name(name, extra=("auto",))


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


# ----------------------------------------------------------------------------------------------
# Side files


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

    transformers picks a tokenizer class from config.json's model_type when it knows it. The
    export's is the source's, but lpconvert reads its exports with an LPConfig (model_type
    "lpconvert", unknown to transformers), as AutoTokenizer reads older exports: without this the
    same files could load as a different class than the source's (e.g. a generic backend instead
    of Qwen2Tokenizer).
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
    healed: list[str] = field(default_factory=list)  # tensors replaced from a heal file
    format: str = "safetensors"  # or gguf (ggufexport.py)
    notes: list[str] = field(default_factory=list)  # what the user should know about the result

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HealedPiece:
    """An export tensor that rows [start, stop) of a heal file's tensor replace."""

    heal_name: str
    start: int
    stop: int
    heads_dim: int | None  # the dimension holding heads, put in the export's unit order; None: not heads


def healed_pieces(tensors: list[OutputTensor], plan: Plan, arch: Architecture, config) -> dict[str, HealedPiece]:
    """Export tensor name -> the part of a heal file tensor that may replace it (healfile.EXPORT_PARTS)."""
    shapes = {t.name: t.info.shape for t in tensors}
    rules = {rule.out: rule for rule in arch.active_rules(config)}
    pieces = {}
    for pair in plan.pairs:
        prefix = LAYER_PREFIX.format(block_of_pair(plan, pair))
        for part, outs in EXPORT_PARTS.items():
            start = 0
            for out in outs:
                rule = rules[out]
                rows = shapes[prefix + out][0]
                heads_dim = (0 if rule.kind == "rows" else 1) if rule.heads else None
                pieces[prefix + out] = HealedPiece(tensor_name(plan, pair, part), start, start + rows, heads_dim)
                start += rows
    return pieces


def healed(tensors: list[OutputTensor], heal: HealFile, plan: Plan, fingerprint: dict, content: str | None,
           dtype: torch.dtype, arch: Architecture, config) -> list[OutputTensor]:
    """The export's tensors with the heal file's in place of the pairs' projections it holds.

    Only the pairs' projections (healfile.HEALED_PARTS) can be replaced; the heal file must be for this source
    and this plan. A fused one replaces the separate tensors it holds, heads put in the export's unit order
    (archs.Rule.heads). A replacement is cast to the export's dtype once, like every other tensor.
    """
    pieces = healed_pieces(tensors, plan, arch, config)
    shapes = {t.name: t.info.shape for t in tensors}
    fused_shapes: dict[str, tuple[int, ...]] = {}
    for name, piece in pieces.items():
        shape = shapes[name]  # heal files hold the export's [a | b] layout for every projection
        rows = fused_shapes.get(piece.heal_name, (0,))[0] + shape[0]
        fused_shapes[piece.heal_name] = (rows, *shape[1:])
    check_heal_for(heal, fingerprint, content, plan, fused_shapes)
    units = arch.head_units(config)

    def replaced(tensor: OutputTensor) -> OutputTensor:
        piece = pieces[tensor.name]

        def build():  # read when its shard is written: memory holds one replacement at a time
            values = checked_tensor(heal, piece.heal_name)[piece.start:piece.stop]
            if piece.heads_dim is not None and units > 1:
                values = unit_order(values, units, piece.heads_dim)
            yield values.to(dtype)

        return OutputTensor(tensor.name, tensor.info, build, origin=f"heal file {heal.path}")

    return [replaced(t) if t.name in pieces and pieces[t.name].heal_name in heal.shapes else t for t in tensors]


# The largest magnitude each type a tensor is written in holds (q8_0: 127 steps of a float16 block scale).
STORED_RANGES = {"float32": "3.40e38", "bfloat16": "3.39e38", "float16": "65504",
                 "q8_0": "127 x 65504: its block scales are float16"}


def refuse_nonfinite(values: torch.Tensor, tensor: OutputTensor, stored_as: str, wider: str | None) -> None:
    """Refuse to write VALUES (part of TENSOR, as stored in the type STORED_AS) when they hold NaN or Inf.

    The inputs are checked before they are combined and rounded (blocks.py, healfile.checked_tensor), and a
    value that passes can still overflow on the way: a float32 1e38 is inf in float16, a float64 1e300 in
    float32. `wider`: the option that writes a type wide enough, when there is one.
    """
    if not values.is_floating_point() or all_finite(values):
        return
    where = f"{tensor.origin}: {tensor.name}" if tensor.origin else f"tensor {tensor.name}"
    remake = "re-run `lpconvert heal`" if tensor.origin else None  # only a heal file replaces the source's values
    if bool(torch.isnan(values).any()):  # rounding and folding finite values never make NaN: the input held it
        raise LPError(f"{where} contains NaN", remake or "the source weights are corrupt; re-download the checkpoint")
    fixes = [f"export with {wider}" if wider else None, remake]
    fix = ", or ".join(f for f in fixes if f) or "the source weights are corrupt or too large to fold; re-download them"
    raise LPError(f"{where} holds values beyond {stored_as}'s range ({STORED_RANGES[stored_as]}), the type it is "
                  "written in", fix)


def refusing_nonfinite(tensor: OutputTensor, dtype: torch.dtype) -> OutputTensor:
    """TENSOR with each piece it builds checked as it is written (`refuse_nonfinite`): one pass over what is
    computed anyway. FileSlices, the source's bytes copied unchanged without being read, are not read for it."""
    stored_as = str(dtype).removeprefix("torch.")
    wider = "--dtype float32 or bfloat16" if dtype == torch.float16 else None

    def build() -> Iterator:
        for piece in tensor.build():
            if not isinstance(piece, FileSlice):
                refuse_nonfinite(piece, tensor, stored_as, wider)
            yield piece

    return replace(tensor, build=build)


def checked_source(source, plan: Plan):
    """(architecture, fingerprint) of a source every export format can read, and that `plan` was made for."""
    config, store = source.config, source.store
    arch = architecture_for(config)
    fingerprint = source_fingerprint(config, store)
    check_fingerprint(plan.source, fingerprint, "the plan")
    check_config_matches_weights(arch, config, store)
    check_float_weights(arch, store)
    check_layer_tensors(arch, config, store, config.num_hidden_layers)
    return arch, fingerprint


def export(source, plan: Plan, out: Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
           copy_tokenizer_files: bool = True, overwrite: bool = False, dry_run: bool = False,
           heal: HealFile | None = None, progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write the layer-parallel checkpoint of `source` under `plan` to `out` (atomically).

    `heal`: a heal file (lpconvert heal) whose weights replace the pairs' output projections.
    `progress(bytes_written, total_bytes)` is called after each tensor.
    """
    started = time.perf_counter()
    config, store = source.config, source.store
    arch, fingerprint = checked_source(source, plan)
    target_dtype = resolve_dtype(dtype, store)
    blocks = plan.blocks()
    content = content_digest(arch, store)
    lp_config = lp_config_dict(arch, config, plan, target_dtype, source.name, content)
    tensors = all_output_tensors(arch, config, store, blocks, target_dtype)
    if heal is not None:
        tensors = healed(tensors, heal, plan, fingerprint, content, target_dtype, arch, config)
        lp_config["lp_heal"] = heal.summary()
    tensors = [refusing_nonfinite(t, target_dtype) for t in tensors]
    shards = plan_shards(tensors, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    report = ExportReport(
        out=str(out), dry_run=dry_run, source=source.name, num_layers=plan.num_layers,
        effective_depth=plan.effective_depth, pairs=[[p, p + 1] for p in plan.pairs], blocks=blocks,
        dtype=lp_config["dtype"], healed=heal.summary()["tensors"] if heal is not None else [],
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
        for file in MODELING_FILES:
            shutil.copy2(MODELING_DIR / file, tmp / file)
        pinned = tokenizer_class.result() if tokenizer_class else None
        if tokenizer_class:
            report.tokenizer_files = copy_tokenizer(source, tmp, pinned)
        write_generation_config(source, tmp)
        # what loading the folder needs, as written: lpconvert checks it is still there when it reads the export
        lp_config["lp_files"] = shipped_files(tmp, [*MODELING_FILES, *report.tokenizer_files])
        (tmp / "config.json").write_text(json.dumps(lp_config, indent=2, sort_keys=True) + "\n")
        plan.save(tmp / PLAN_FILE)
        (tmp / "README.md").write_text(model_card(source.name, plan, lp_config, getattr(source, "hub_id", None),
                                                  pinned))
    report.seconds = time.perf_counter() - started
    return report


def plan_for_pairs(source, pairs: list[int], allow_edge_layers: bool = False) -> Plan:
    """A manual plan (`--pairs`) for this source: the library's shortcut to formats.plan_for_source."""
    return plan_for_source(source_fingerprint(source.config, source.store), pairs=pairs,
                           allow_edge_layers=allow_edge_layers)
