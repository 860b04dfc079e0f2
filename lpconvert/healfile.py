"""The heal file (written by the heal stage, read by export): the replacement weights of the paired blocks, and what they were made for.

A safetensors file holding, under the names of the pair's block (`model.layers.{block}.mlp.down_proj.weight`,
`...self_attn.o_proj.weight`, and after distill the fused `...self_attn.qkv_proj.weight` ([q_a, q_b, k_a, k_b,
v_a, v_b] rows) and `...mlp.gate_up_proj.weight` ([gate_a, gate_b, up_a, up_b]) with each layer's norm folded
in), the healed weights of the pairs whose correction was kept, in float32, a's heads before b's. The export
splits the fused ones into its separate projections and puts heads in its unit order (`EXPORT_PARTS`,
export.healed),
with a JSON header in the safetensors metadata: schema version, the source's fingerprint and content
digest, the plan's pairs, calibration provenance, method and settings. `export --heal` reads it and
refuses one made for another source or another plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .archs import LAYER_PREFIX
from .checks import shown
from .errors import LPError
from .formats import Plan, same_shapes
from .outputs import OwnedFile, check_owned_output
from .settings import HEAL_METHODS

HEAL_KIND = "lpconvert-heal"
HEAL_SCHEMA_VERSION = 1
METADATA_KEY = "lpconvert_heal"
# A pair's fused projections a heal may replace (runner.LayerRunner's names -> the export's).
HEALED_PARTS = {"qkv_proj": "self_attn.qkv_proj.weight", "o_proj": "self_attn.o_proj.weight",
                "gate_up_proj": "mlp.gate_up_proj.weight", "down_proj": "mlp.down_proj.weight"}


# Each projection of a heal file -> the export's tensors it holds, row ranges in this order.
EXPORT_PARTS = {"qkv_proj": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                "o_proj": ("self_attn.o_proj.weight",),
                "gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                "down_proj": ("mlp.down_proj.weight",)}


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


def write_heal_file(path: Path, tensors: dict[str, torch.Tensor], header: dict, overwrite: bool | None = None) -> None:
    """Write atomically (a temporary file renamed into place). With `overwrite` (the CLI's flag), what is at
    the path is checked once more just before it is replaced (`check_heal_outputs` checked it before the work)."""
    from safetensors.torch import save_file

    from .outputs import atomic_output_file

    contiguous = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    kind = HEAL_OUTPUT if overwrite is not None else None
    with atomic_output_file(Path(path), kind, bool(overwrite)) as tmp:
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
    header = _parse_header(metadata.get(METADATA_KEY, "null"), path)
    if not isinstance(header, dict) or header.get("kind") != HEAL_KIND:
        raise LPError(f"{path} is not an lpconvert heal file (no {METADATA_KEY} header)",
                      "pass a file written by `lpconvert heal`")
    if header.get("schema_version") != HEAL_SCHEMA_VERSION:
        raise LPError(f"heal file {path} has schema_version {shown(header.get('schema_version'))}; this lpconvert "
                      f"reads {HEAL_SCHEMA_VERSION}", "re-run `lpconvert heal` with this version")
    check_header(header, path)
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


# ----------------------------------------------------------------------------------------------
# The header, checked as data: export prints it into config.json and the model card, so a field of
# the wrong type is refused here in one line rather than failing (or being printed) later.


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_is_count, value)) and value[1] == value[0] + 1


def _is_perplexity(value) -> bool:
    """{} (nothing measured) or the held-out perplexity before and after, and on how many tokens."""
    if not isinstance(value, dict):
        return False
    if not value:
        return True
    numbers = [value.get("unhealed"), value.get("healed")]
    return (all(isinstance(n, (int, float)) and not isinstance(n, bool) and 0 < n < math.inf for n in numbers)
            and _is_count(value.get("tokens")) and value["tokens"] > 0)


def _is_row(value) -> bool:
    flags = [value.get(key) for key in ("accepted", "changed") if key in value] if isinstance(value, dict) else [0]
    return isinstance(value, dict) and _is_pair(value.get("pair")) and all(isinstance(f, bool) for f in flags)


def _is_source(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get("fingerprint"), dict) and isinstance(value.get("content_sha256"), (str, type(None))))


HEADER_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {  # key: (is it valid, what it must be)
    "source": (_is_source, "a mapping with name, fingerprint and content_sha256"),
    "plan": (lambda v: isinstance(v, dict) and isinstance(v.get("pairs"), list) and all(map(_is_pair, v["pairs"])),
             "a mapping whose pairs are [i, i+1] lists"),
    "method": (lambda v: v in HEAL_METHODS, "one of " + ", ".join(HEAL_METHODS)),
    "settings": (lambda v: isinstance(v, dict), "a mapping"),
    "calibration": (lambda v: isinstance(v, dict), "a mapping"),
    "heldout": (lambda v: isinstance(v, dict), "a mapping"),
    "pairs": (lambda v: isinstance(v, list) and all(map(_is_row, v)),
              "a list of rows, each naming its pair as [i, i+1]"),
    "heldout_perplexity": (_is_perplexity, "{} or positive unhealed and healed perplexities with their tokens"),
    "created_by": (lambda v: isinstance(v, str), "a string"),
}


def check_header(header: dict, path) -> None:
    for key, (valid, words) in HEADER_FIELDS.items():
        if key not in header:
            raise LPError(f"heal file {path}: its header has no {key}", "re-run `lpconvert heal`")
        if not valid(header[key]):
            raise LPError(f"heal file {path}: header field {key} must be {words}, got {shown(header[key])}",
                          "re-run `lpconvert heal`")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_header(text: str, path) -> object:
    """The JSON header; NaN and Infinity (which Python's json accepts) and absurd nesting are refused."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise LPError(f"heal file {path}: its header is nested too deeply to be a heal header",
                      "re-run `lpconvert heal`") from None
    except ValueError as exc:  # JSONDecodeError, or NaN/Infinity
        raise LPError(f"heal file {path}: its header is not valid JSON ({str(exc)[:80]})",
                      "re-run `lpconvert heal`") from None


# ----------------------------------------------------------------------------------------------
# Whether lpconvert wrote the file at a path: `heal --overwrite` replaces only such a heal file and report.

MAX_REPORT_BYTES = 100 * 2**20  # a heal report is kilobytes; a larger JSON file is not one


def is_heal_file(path: Path) -> bool:
    """A safetensors file whose metadata holds an lpconvert heal header (read from the header alone)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return json.loads(metadata.get(METADATA_KEY, "null")).get("kind") == HEAL_KIND
    except (SafetensorError, OSError, ValueError, AttributeError, RecursionError):
        return False


def is_heal_report(path: Path) -> bool:
    """A JSON report `lpconvert heal` wrote beside its heal file (kind lpconvert-heal)."""
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            return False
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == HEAL_KIND
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


FIX = "write the heal file outside any model folder, e.g. -o heal.safetensors"
HEAL_OUTPUT = OwnedFile("heal file", (".safetensors",), "heal.safetensors", is_heal_file, FIX)
HEAL_REPORT = OwnedFile("heal report", (".json",), "heal.json", is_heal_report, FIX)


def check_heal_outputs(output: Path, overwrite: bool, protect, inputs=()) -> Path:
    """Refuse a heal file path, or the report path derived from it, that would replace what lpconvert did not
    write, or that lies in a model folder; returns the report's path."""
    protect, inputs = list(protect), list(inputs)
    check_owned_output(output, HEAL_OUTPUT, overwrite, protect, inputs)
    report = output.with_suffix(".json")
    check_owned_output(report, HEAL_REPORT, overwrite, protect, inputs, beside=output)
    return report
