"""The small versioned JSON files that join the stages, and the model fingerprint they carry.

A plan says which consecutive layers run as layer-parallel pairs. It names the model it was made
for by a fingerprint (architecture, layer count, hashes of the shape-defining config fields and of
the weight index), so export refuses a plan made for another model; a digest of a few weights
(`content_digest`) tells apart models of the same shapes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .checks import percent_fraction, shown
from .errors import LPError

if TYPE_CHECKING:
    from .archs import Architecture
    from .checkpoint import TensorStore

PLAN_KIND = "lpconvert-plan"
PLAN_SCHEMA_VERSION = 1

# Config fields that define the shapes a plan depends on; dtype, paths and runtime flags are left
# out so the same model loaded from GGUF, from a folder or cast to bfloat16 keeps its fingerprint.
_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                       "tie_word_embeddings")


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(config, tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Identify a source model by what a plan depends on: its architecture and tensor shapes. (An export's head
    counts and MLP width are one layer's: its blocks' differ.)"""
    from .archs import one_layer_value  # here: settings.py imports this module and must stay light

    fields = {name: one_layer_value(config, name) for name in _FINGERPRINT_FIELDS}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    index = sorted((name, list(shape)) for name, shape in tensor_shapes.items()
                   if not (tied and name == "lm_head.weight") and not name.endswith("rotary_emb.inv_freq"))
    found = {
        "architecture": fields["model_type"],
        "num_layers": fields["num_hidden_layers"],
        "config_sha256": _sha256_json(fields),
        "weights_sha256": _sha256_json(index),
    }
    unpairable = _unpairable(config)
    if unpairable:  # only where some are: fingerprints of other models stay as they were
        found["unpairable"] = unpairable
    return found


def _unpairable(config) -> list[int]:
    """Pair starts whose two layers differ in attention type (archs.unpairable_starts), for the plan stage."""
    from .archs import unpairable_starts  # here: settings.py imports this module and must stay light

    try:
        return unpairable_starts(config)
    except (AttributeError, TypeError):  # a config without layer counts (a hand-made test config)
        return []


def source_fingerprint(config, store) -> dict:
    """The fingerprint of a model source: its config and the names and shapes of its tensors."""
    return fingerprint(config, {name: info.shape for name, info in store.infos().items()})


def content_digest(arch: Architecture, store: TensorStore, rows: int = 8) -> str:
    """A hash of a few of the source's weights: the final norm and the first rows of the embedding.

    The fingerprint covers shapes only, so a fine-tune or the base model of the same shape would pass
    for the source; these values tell them apart. Hashed as bfloat16, so the same weights stored in
    float32 or cast to bfloat16 (or read from an F32 GGUF) give the same digest.
    """
    import torch  # here, not at the top: settings.py imports this module and must stay light

    digest = hashlib.sha256()
    for weight in (*arch.post_weights[:1], *arch.pre_weights[:1]):
        if weight.name not in store.infos():
            continue
        info = store.infos()[weight.name]
        tensor = store.read_rows(weight.name, 0, min(rows, info.shape[0])) if len(info.shape) > 1 \
            else store.read(weight.name)
        digest.update(weight.name.encode())
        digest.update(tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def check_converted_from(converted, source, role: str = "CONVERTED") -> None:
    """Refuse to compare an lpconvert export with a model it was not converted from.

    Comparing with an unrelated model of the same vocabulary would report nonsense (a huge
    perplexity *improvement*) and let a quality gate pass: the export's config names its source
    by fingerprint (lp_source), so a mismatch is caught before anything runs.
    """
    lp_source = getattr(converted.config, "lp_source", None)
    if getattr(source.config, "lp_source", None) and not lp_source:
        raise LPError(f"{source.name} is an lpconvert export and {converted.name} is not",
                      f"pass the original model first and the converted one as {role}")
    if not isinstance(lp_source, dict) or not isinstance(lp_source.get("fingerprint"), dict):
        return  # not an lpconvert export: nothing records where it came from
    actual = source_fingerprint(source.config, source.store)
    expected = lp_source["fingerprint"]
    if not same_shapes(expected, actual):
        raise LPError(f"{converted.name} was converted from another model ({lp_source.get('name')}, "
                      f"{expected.get('num_layers')} layers) than {source.name} ({actual['num_layers']} layers, "
                      "or different shapes)", "compare a converted model with the model it was converted from")
    if lp_source.get("content_sha256") and lp_source["content_sha256"] != _content_of(source):
        raise LPError(f"{converted.name} was converted from another model ({lp_source.get('name')}) than "
                      f"{source.name}: same shapes, other weights (a fine-tune or a base model?)",
                      "compare a converted model with the model it was converted from")


def check_same_tokenizer(source, converted) -> None:
    """Two models can only be compared token by token if they share a vocabulary."""
    a, b = source.config.vocab_size, converted.config.vocab_size
    if a != b:
        raise LPError(f"the models have different vocabulary sizes ({a} and {b})",
                      "compare a converted model with the model it was converted from")
    if source.tokenizer_path and converted.tokenizer_path:
        if source.load_tokenizer().get_vocab() != converted.load_tokenizer().get_vocab():
            raise LPError("the models have different tokenizers",
                          "compare a converted model with the model it was converted from")


def _content_of(source) -> str | None:
    from .archs import architecture_for

    try:
        return content_digest(architecture_for(source.config), source.store)
    except LPError:  # an architecture without a table: its shapes are all that can be compared
        return None


def origin_of(model) -> tuple[dict, str | None]:
    """Where a model's weights come from: an export's recorded source, or the model itself."""
    lp_source = getattr(model.config, "lp_source", None)
    if isinstance(lp_source, dict) and isinstance(lp_source.get("fingerprint"), dict):
        return lp_source["fingerprint"], lp_source.get("content_sha256")
    return source_fingerprint(model.config, model.store), _content_of(model)


def check_same_origin(a, b) -> None:
    """Two models timed side by side (bench) must come from one source model, in either order: a
    source and its export, or two exports of it."""
    (fa, ca), (fb, cb) = origin_of(a), origin_of(b)
    if not same_shapes(fa, fb) or (ca and cb and ca != cb):
        raise LPError(f"{a.name} and {b.name} do not come from the same source model",
                      "time a converted model against the model it was converted from")


def same_shapes(a: dict, b: dict) -> bool:
    """Two fingerprints of one model (architecture, layers, config and weight-index hashes)."""
    return all(a.get(k) == b.get(k) for k in ("architecture", "num_layers", "config_sha256", "weights_sha256"))


def check_fingerprint(expected: dict, actual: dict, what: str) -> None:
    if not same_shapes(expected, actual):
        raise LPError(
            f"{what} was made for another model ({expected.get('architecture')}, "
            f"{expected.get('num_layers')} layers) than this one ({actual['architecture']}, "
            f"{actual['num_layers']} layers, or different shapes)",
            "re-run the earlier stage on this model",
        )


# ----------------------------------------------------------------------------------------------
# Pairs


def validate_pairs(firsts: list[int], num_layers: int, allow_edge_layers: bool = False,
                   unpairable: Collection[int] = ()) -> list[int]:
    """Check pair starts (12 means layers 12 and 13) and return them sorted. `unpairable`: starts whose two
    layers differ in attention type (the source fingerprint's)."""
    for first in firsts:
        if isinstance(first, bool) or not isinstance(first, int):
            raise LPError(f"pair start {first!r} is not a layer index", "give integers like --pairs 12,14")
        if first < 0 or first + 1 >= num_layers:
            raise LPError(f"pair ({first}, {first + 1}) is out of range for a model of {num_layers} layers",
                          f"use pair starts between 0 and {num_layers - 2}")
    ordered = sorted(firsts)
    mixed = [f for f in ordered if f in unpairable]
    if mixed:
        a = mixed[0]
        pairable = ", ".join(str(p) for p in range(num_layers - 1) if p not in unpairable)
        raise LPError(f"pair ({a}, {a + 1}) joins a local (sliding-window) and a global layer, whose masks and "
                      "rotary bases differ", f"pair two local or two global layers; pair starts that can: {pairable}")
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b - a < 2:
            raise LPError(f"pairs ({a}, {a + 1}) and ({b}, {b + 1}) overlap", "each layer can be in one pair only")
    edges = [f for f in ordered if f == 0 or f + 1 == num_layers - 1]
    if edges and not allow_edge_layers:
        edge = edges[0]
        raise LPError(f"pair ({edge}, {edge + 1}) includes the first or last layer, which tolerate pairing worst",
                      "drop it or pass --allow-edge-layers")
    return ordered


def plan_for_source(fingerprint_of_source: dict, *, plan: Plan | None = None, plan_name: str = "the plan",
                    pairs: list[int] | None = None, allow_edge_layers: bool = False) -> Plan:
    """The plan an export of this source follows: a plan file checked against the source, or the
    manual plan of `pairs` (exactly one of the two)."""
    if plan is not None:
        check_fingerprint(plan.source, fingerprint_of_source, plan_name)
        validate_pairs(plan.pairs, plan.num_layers, allow_edge_layers, fingerprint_of_source.get("unpairable", ()))
        return plan
    ordered = validate_pairs(pairs or [], int(fingerprint_of_source["num_layers"]), allow_edge_layers,
                             fingerprint_of_source.get("unpairable", ()))
    return Plan(source=fingerprint_of_source, pairs=ordered, strategy="manual")


def parse_pairs(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LPError(f"--pairs '{text}' is not a comma-separated list of layer indices",
                      "write e.g. --pairs 12,14,16 (12 pairs layers 12 and 13)") from None


def parse_percent(text: str | float, option: str) -> float:
    """'5%' -> 0.05: every percentage is written with its sign (checks.percent_fraction), and is not negative."""
    value = percent_fraction(text, option)
    if value < 0:
        raise LPError(f"{option} must be a positive percentage, got '{text}'", f"write e.g. {option} 5%")
    return value


def blocks_for(pairs: list[int], num_layers: int) -> list[list[int]]:
    """Source layers of each block: [[0], [1], [2, 3], [4], ...]."""
    starts = set(pairs)
    blocks, layer = [], 0
    while layer < num_layers:
        if layer in starts:
            blocks.append([layer, layer + 1])
            layer += 2
        else:
            blocks.append([layer])
            layer += 1
    return blocks


def layer_strip(pairs: list[int], num_layers: int) -> str:
    """One line showing the stack: '·' a copied layer, '╔╝' the two layers of a pair."""
    starts = set(pairs)
    cells = []
    for layer in range(num_layers):
        if layer in starts:
            cells.append("╔")
        elif layer - 1 in starts:
            cells.append("╝")
        else:
            cells.append("·")
    return "".join(cells)


# ----------------------------------------------------------------------------------------------
# Plan file


@dataclass
class Plan:
    source: dict  # fingerprint
    pairs: list[int]  # first layer of each pair
    strategy: str = "manual"
    metric: str | None = None
    target: dict | None = None
    calibration: dict | None = None
    details: dict = field(default_factory=dict)  # strategy-specific: measured losses, search trace...

    @property
    def num_layers(self) -> int:
        return int(self.source["num_layers"])

    @property
    def effective_depth(self) -> int:
        return self.num_layers - len(self.pairs)

    def blocks(self) -> list[list[int]]:
        return blocks_for(self.pairs, self.num_layers)

    def to_json(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "kind": PLAN_KIND,
            "source": self.source,
            "pairs": [[p, p + 1] for p in self.pairs],
            "effective_depth": self.effective_depth,
            "strategy": self.strategy,
            "metric": self.metric,
            "target": self.target,
            "calibration": self.calibration,
            "details": self.details,
            "created_by": f"lpconvert {__version__}",
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_json_file(path: Path, what: str) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a device, a pipe: not read at all
        raise LPError(f"{what} file {path} is not a regular file", f"give the path of a {what} JSON file")
    if not path.is_file():
        raise LPError(f"{what} file {path} does not exist", f"give the path of a {what} JSON file")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise LPError(f"{what} file {path} is nested too deeply to be one", f"regenerate the {what}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LPError(f"{what} file {path} is not valid JSON ({str(exc)[:80]})", f"regenerate the {what}") from None
    if not isinstance(data, dict):
        raise LPError(f"{what} file {path} does not hold a JSON object", f"regenerate the {what}")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def load_plan(path: Path) -> Plan:
    return plan_from_json(load_json_file(path, "plan"), path)


def _check_kind(data: dict, path, kind: str, version: int, *, what: str, written_by: str, its_version: str,
                regenerate: str) -> None:
    """A file of this kind and schema version, or one line saying what it is instead."""
    if data.get("kind") != kind:
        raise LPError(f"{path} is not an lpconvert {what} (kind is {shown(data.get('kind'))})",
                      f"pass a file written by {written_by}")
    if data.get("schema_version") != version:
        raise LPError(f"{its_version} schema_version {shown(data.get('schema_version'))}; this lpconvert reads {version}",
                      regenerate)


# The plan's optional fields and the JSON types each may hold (None: not set).
PLAN_FIELD_TYPES = {"strategy": str, "metric": (str, type(None)), "target": (dict, type(None)),
                    "calibration": (dict, type(None)), "details": (dict, type(None))}


def plan_from_json(data: dict, path: Path | str = "the plan") -> Plan:
    """A Plan from its JSON (as written by Plan.save), refused naming `path` if it is not one."""
    _check_kind(data, path, PLAN_KIND, PLAN_SCHEMA_VERSION, what="plan", its_version=f"plan {path} has",
                written_by="`lpconvert plan` or `lpconvert export --pairs`",
                regenerate="regenerate the plan with this version of lpconvert")
    pairs, source = data.get("pairs"), data.get("source")
    # A mapping or a string would iterate too: {"14": 15} would read as the pair ("1", "4").
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs) \
            or not isinstance(source, dict):
        raise LPError(f"plan {path} lacks valid 'pairs' (a list of [i, i+1]) or 'source' (a mapping) fields",
                      "regenerate the plan")
    raw_pairs = [(a, b) for a, b in pairs]
    for key, kinds in PLAN_FIELD_TYPES.items():
        if key in data and not isinstance(data[key], kinds):
            raise LPError(f"plan {path}: '{key}' is a {type(data[key]).__name__}, not what `lpconvert plan` writes",
                          "regenerate the plan")
    if not _is_int(source.get("num_layers")):
        raise LPError(f"plan {path} has no integer source.num_layers", "regenerate the plan")
    for a, b in raw_pairs:
        # Strings, floats and booleans are refused, not coerced: `true` would otherwise become layer 1.
        if not (_is_int(a) and _is_int(b)):
            raise LPError(f"plan pair {json.dumps([a, b])} is not two layer indices",
                          "write each pair as two integers [i, i+1]")
        if b != a + 1:
            raise LPError(f"plan pair ({a}, {b}) is not two consecutive layers", "write each pair as [i, i+1]")
    pairs = [a for a, _ in raw_pairs]
    return Plan(source=source, pairs=pairs, strategy=data.get("strategy", "manual"), metric=data.get("metric"),
                target=data.get("target"), calibration=data.get("calibration"), details=data.get("details") or {})



# ----------------------------------------------------------------------------------------------
# Scores file

SCORES_KIND = "lpconvert-scores"
SCORES_SCHEMA_VERSION = 1
# Per-pair metrics and which direction is safer to pair: "low" means a smaller value is safer.
PAIR_METRICS = {
    "loss_increase": "low",  # measured: relative calibration loss increase with only that pair parallel
    "pair_rel_l2": "low",  # ||parallel - sequential|| / ||sequential - input|| on captured hidden states
    "pair_cosine": "high",  # cosine between the parallel and sequential outputs' updates
    "angular_distance": "low",  # arccos(cos(x_i, x_{i+2})) / pi across the two layers
}


def _check_pair_rows(rows: list, path: Path) -> None:
    """Every pair row names its first layer, and every metric it has is a number: a string or NaN
    would otherwise make planning fall back to another metric without a word."""
    for row in rows:
        if not isinstance(row, dict) or not _is_int(row.get("first")):
            raise LPError(f"scores {path} hold a pair row without an integer 'first': {json.dumps(row)[:80]}",
                          "re-run `lpconvert score`")
        for metric in (*PAIR_METRICS, "loss", "perplexity"):
            if metric in row and row[metric] is not None and not _is_number(row[metric]):
                raise LPError(f"scores {path}: pair {row['first']} has a non-numeric {metric} "
                              f"({json.dumps(row[metric])[:40]})", "re-run `lpconvert score`")


def load_scores(path: Path, expected_source: dict | None = None) -> dict:
    """Read a scores file; refuse another kind, another schema, or (if given) another model."""
    data = load_json_file(path, "scores")
    _check_kind(data, path, SCORES_KIND, SCORES_SCHEMA_VERSION, what="scores file", its_version=f"scores {path} have",
                written_by="`lpconvert score`", regenerate="re-run `lpconvert score` with this version")
    if not isinstance(data.get("pairs"), list) or not isinstance(data.get("source"), dict):
        raise LPError(f"scores {path} lack 'pairs' or 'source'", "re-run `lpconvert score`")
    _check_pair_rows(data["pairs"], path)
    if expected_source is not None:
        check_fingerprint(data["source"], expected_source, f"scores {path}")
    return data
