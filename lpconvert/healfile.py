"""The heal file (written by the heal stage, read by export): the replacement weights of the paired blocks, and what they were made for.

A safetensors file holding, under the export's own tensor names (`model.layers.{block}.mlp.down_proj.weight`,
`...self_attn.o_proj.weight`, and after distill `...self_attn.qkv_proj.weight` and `...mlp.gate_up_proj.weight`
with each layer's norm folded in, exactly as the export builds them), the healed weights of the pairs
whose correction was kept, in float32,
with a JSON header in the safetensors metadata: schema version, the source's fingerprint and content
digest, the plan's pairs, calibration provenance, method and settings. `export --heal` reads it and
refuses one made for another source or another plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .archs import LAYER_PREFIX
from .errors import LPError
from .formats import Plan, same_shapes

HEAL_KIND = "lpconvert-heal"
HEAL_SCHEMA_VERSION = 1
METADATA_KEY = "lpconvert_heal"
# A pair's fused projections a heal may replace (runner.LayerRunner's names -> the export's).
HEALED_PARTS = {"qkv_proj": "self_attn.qkv_proj.weight", "o_proj": "self_attn.o_proj.weight",
                "gate_up_proj": "mlp.gate_up_proj.weight", "down_proj": "mlp.down_proj.weight"}


def block_of_pair(plan: Plan, pair: int) -> int:
    return next(i for i, layers in enumerate(plan.blocks()) if layers[0] == pair and len(layers) == 2)


def tensor_name(plan: Plan, pair: int, projection: str) -> str:
    """The export's name of a pair's fused projection."""
    return LAYER_PREFIX.format(block_of_pair(plan, pair)) + HEALED_PARTS[projection]


def corrections_of(tensors: Mapping[str, torch.Tensor], plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    """A heal file's tensors by pair start and projection: runner.LayerRunner's `corrections`."""
    by_name = {tensor_name(plan, pair, part): (pair, part) for pair in plan.pairs for part in HEALED_PARTS}
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        pair, part = by_name[name]
        out.setdefault(pair, {})[part] = tensor
    return out


class StoredTensors(Mapping):
    """A heal file's tensors, each read from disk only when asked for: export builds one at a time,
    so a 70B heal file (several GB of float32) never sits in memory whole."""

    def __init__(self, path: Path, names: list[str]):
        self.path = path
        self.names = names

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class HealFile:
    header: dict
    tensors: Mapping[str, torch.Tensor]  # a dict in memory, or StoredTensors read on demand
    path: str = "heal file"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # filled from `tensors` when empty

    def __post_init__(self):
        if not self.shapes:
            self.shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}

    @property
    def method(self) -> str:
        return str(self.header.get("method"))

    def summary(self) -> dict:
        """What an export records about the heal it applied (config.json lp_heal, the model card)."""
        healed = [row["pair"] for row in self.header.get("pairs", []) if row.get("changed", row.get("accepted"))]
        return {"method": self.method, "pairs_healed": healed, "tensors": sorted(self.tensors),
                "calibration": self.header.get("calibration"), "settings": self.header.get("settings"),
                "heldout_perplexity": self.header.get("heldout_perplexity"),
                "created_by": self.header.get("created_by")}


def write_heal_file(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    from .outputs import atomic_output_file

    contiguous = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    with atomic_output_file(Path(path)) as tmp:
        save_file(contiguous, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def heal_header(*, source_name: str, fingerprint: dict, content_sha256: str | None, plan: Plan, method: str,
                settings: dict, calibration: dict, heldout: dict, pairs: list[dict], perplexity: dict) -> dict:
    return {
        "kind": HEAL_KIND,
        "schema_version": HEAL_SCHEMA_VERSION,
        "source": {"name": source_name, "fingerprint": fingerprint, "content_sha256": content_sha256},
        "plan": {"pairs": [[p, p + 1] for p in plan.pairs], "source": plan.source},
        "method": method,
        "settings": settings,
        "calibration": calibration,
        "heldout": heldout,
        "pairs": pairs,
        "heldout_perplexity": perplexity,
        "created_by": f"lpconvert {__version__}",
    }


def load_heal_file(path: Path) -> HealFile:
    """Read a heal file, or one line saying why it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise LPError(f"heal file {path} {what}", "give the .safetensors file written by `lpconvert heal`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            shapes = {name: tuple(piece.get_shape()) for name, piece in slices.items()}
            dtypes = {name: piece.get_dtype() for name, piece in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LPError(f"heal file {path} is not a readable safetensors file ({str(exc)[:80]})",
                      "re-run `lpconvert heal`") from None
    try:
        header = json.loads(metadata.get(METADATA_KEY, "null"))
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != HEAL_KIND:
        raise LPError(f"{path} is not an lpconvert heal file (no {METADATA_KEY} header)",
                      "pass a file written by `lpconvert heal`")
    if header.get("schema_version") != HEAL_SCHEMA_VERSION:
        raise LPError(f"heal file {path} has schema_version {header.get('schema_version')!r}; this lpconvert reads "
                      f"{HEAL_SCHEMA_VERSION}", "re-run `lpconvert heal` with this version")
    for name, dtype in dtypes.items():
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise LPError(f"heal file {path}: {name} is stored as {dtype}, not as floating-point weights",
                          "re-run `lpconvert heal`")
    return HealFile(header=header, tensors=StoredTensors(path, sorted(shapes)), path=str(path), shapes=shapes)


def check_heal_for(heal: HealFile, fingerprint: dict, content_sha256: str | None, plan: Plan,
                   expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a heal file made for another source or plan, or holding tensors the export does not write."""
    source = heal.header.get("source") or {}
    if not same_shapes(source.get("fingerprint") or {}, fingerprint) or (
            content_sha256 and source.get("content_sha256") and source["content_sha256"] != content_sha256):
        raise LPError(f"heal file {heal.path} was made for another model ({source.get('name')}) than this source",
                      "re-run `lpconvert heal` on this model and plan")
    made_for = [tuple(p) for p in (heal.header.get("plan") or {}).get("pairs", [])]
    wanted = [(p, p + 1) for p in plan.pairs]
    if made_for != wanted:
        shown = ", ".join(f"({a}, {b})" for a, b in made_for) or "none"
        raise LPError(f"heal file {heal.path} was made for other pairs ({shown}) than this plan's",
                      "heal with the plan you export, or export the plan the heal file was made for")
    for name, shape in heal.shapes.items():
        if name not in expected_shapes:
            raise LPError(f"heal file {heal.path} holds {name}, which is not a healed projection of this plan",
                          "re-run `lpconvert heal`")
        if shape != expected_shapes[name]:
            raise LPError(f"heal file {heal.path}: {name} is {shape}, the export's tensor is "
                          f"{expected_shapes[name]}", "re-run `lpconvert heal`")


def checked_tensor(heal: HealFile, name: str) -> torch.Tensor:
    """One of the heal file's tensors, read now, refused if it holds NaN or Inf."""
    tensor = heal.tensors[name]
    if not bool(torch.isfinite(tensor).all()):
        raise LPError(f"heal file {heal.path}: {name} contains NaN or Inf", "re-run `lpconvert heal`")
    return tensor
