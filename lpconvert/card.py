"""What an export says about itself: its config.json and its model card (README.md).

The config is the source's with the blocks of the plan: the LPConfig that lpconvert's modeling file
(lpconvert/modeling/) runs the blocks with, on disk (`export`) or in memory (`convert_in_memory`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import __version__
from .archs import Architecture, layer_types_of, rope_parameters_of
from .errors import LPError
from .formats import Plan

PLAN_FILE = "lpconvert-plan.json"
MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_lpconvert.py", "modeling_lpconvert.py")  # the code every export ships


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


AUTO_MAP = {
    "AutoConfig": "configuration_lpconvert.LPConfig",
    "AutoModel": "modeling_lpconvert.LPModel",
    "AutoModelForCausalLM": "modeling_lpconvert.LPForCausalLM",
}
_DROPPED_CONFIG_FIELDS = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                          "torch_dtype", "dtype", "layer_types", "num_hidden_layers", "use_sliding_window",
                          "max_window_layers", "rope_scaling", "rope_theta", "quantization_config",
                          "attention_bias", "mlp_bias", "_commit_hash", "hidden_activation", "sliding_window_pattern",
                          "rope_local_base_freq", "final_logit_softcapping", "attn_logit_softcapping",
                          "use_bidirectional_attention", "_sliding_window_pattern")


def lp_config_dict(arch: Architecture, config, plan: Plan, dtype: torch.dtype, source_name: str,
                   content_sha256: str | None = None) -> dict:
    """The exported model's config.json (LPConfig): the source's config with the blocks of the plan.

    Its model_type is the source's, which transformers knows: AutoTokenizer reads config.json first, and would
    ask whether to run the folder's code (auto_map) for a model_type it does not know. The per-block widths
    (per_layer_config) are not written: LPConfig derives them from lp_blocks, and transformers' config class of
    that model_type refuses them."""
    blocks = plan.blocks()
    types = block_layer_types(config, blocks)
    base = {k: v for k, v in config.to_dict().items() if k not in _DROPPED_CONFIG_FIELDS}
    num_heads = config.num_attention_heads
    return {
        **base,
        "architectures": ["LPForCausalLM"],
        "model_type": config.model_type,  # the source's (LPConfig.written_model_type)
        "auto_map": AUTO_MAP,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": num_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "rope_parameters": rope_parameters_of(config),
        "sliding_window": getattr(config, "sliding_window", None) if "sliding_attention" in types else None,
        "layer_types": types,
        "lp_blocks": blocks,
        "lp_projections": "separate",
        "lp_head_chunks": arch.head_units(config),
        **arch.flags(config),
        **arch.model_fields(config),
        "dtype": str(dtype).removeprefix("torch."),
        "lp_source": {
            "name": source_name,
            "model_type": config.model_type,
            "architecture": (getattr(config, "architectures", None) or [arch.hf_class])[0],
            "num_hidden_layers": config.num_hidden_layers,
            "fingerprint": plan.source,
            **({"content_sha256": content_sha256} if content_sha256 else {}),  # formats.content_digest
        },
        "lpconvert_version": __version__,
    }


def _healed_line(heal: dict) -> str:
    """The card's words for a healed export: which method, which pairs, what it did on held-out text."""
    pairs = ", ".join(f"({a}, {b})" for a, b in heal.get("pairs_healed", [])) or "none (no correction helped)"
    ppl = heal.get("heldout_perplexity") or {}
    calib = heal.get("calibration") or {}
    measured = (f"; held-out perplexity {ppl['unhealed']:.2f} -> {ppl['healed']:.2f} on {ppl['tokens']} tokens of "
                f"{calib.get('source', 'the calibration text')}") if ppl.get("unhealed") else ""
    trained = {"all": "projections", "output": "o_proj and down_proj"}.get((heal.get("settings") or {}).get("train"),
                                                                            "projections")
    how = {"lsq": "least-squares refit of the pairs' down_proj on calibration activations (training-free)",
           "distill": f"least-squares refit, then a short KL fine-tune of the pairs' {trained}"}
    return (f"\n- Healed ({heal.get('method')}: {how.get(heal.get('method'), 'see config.json lp_heal')}): "
            f"pairs {pairs}{measured}. Only those pairs' weights differ from the unhealed export; "
            "config.json `lp_heal` records how.")


def model_card(source_name: str, plan: Plan, config: dict, hub_id: str | None = None,
               tokenizer_class: str | None = None) -> str:
    """The README of an export; `base_model` is the source's Hub id when known (the Hub links on it)."""
    pairs = ", ".join(f"({p}, {p + 1})" for p in plan.pairs) or "none"
    heal = config.get("lp_heal")
    healed = _healed_line(heal) if heal else ""
    # AutoTokenizer reads config.json first: its model_type is the source's, which transformers knows, so it
    # runs none of the folder's code and asks nothing. The pinned tokenizer class reads no config.json at all.
    plain_tokenizer = (f"\n# or by its class: "
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
  healed: {json.dumps(heal["method"] if heal else None)}
---

# Layer-parallel {source_name}

Converted by lpconvert {__version__} without retraining: {len(plan.pairs)} pairs of consecutive layers
run side by side, so the model runs {plan.effective_depth} blocks instead of {plan.num_layers}.

- Pairs (layer a, layer b): {pairs}
- Strategy: {plan.strategy}{f" (metric: {plan.metric})" if plan.metric else ""}
- Weights dtype: {config["dtype"]}{healed}

Each pair is one wide block computing

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

with the norm weights folded into the projections. The modeling code in this folder
(`modeling_lpconvert.py`) is the same file for every lpconvert export; it needs only torch and
transformers.

Loading the model requires `trust_remote_code=True`: config.json keeps the source's model_type
({config.get("model_type")}) so that tools which read only the tokenizer need no custom code, and
without the flag transformers would build the source's architecture, which the pairs' wider
weights do not fit. The tokenizer needs no flag.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # required
tokenizer = AutoTokenizer.from_pretrained("PATH"){plain_tokenizer}
```

The plan that produced it is in `{PLAN_FILE}`.
"""


# ----------------------------------------------------------------------------------------------
# Reading an export back: its config.json must still describe its weights

REEXPORT = "re-export the model with lpconvert: an export's config.json must stay as lpconvert wrote it"

# The config.json key that decides whether a tensor exists, by the end of its name (first match wins).
_PRESENCE_KEYS = (
    ("lm_head.weight", "tie_word_embeddings"),
    ("self_attn.o_proj.bias", "attention_out_bias"),
    ("_proj.bias", "attention_bias"),  # q/k/v (after o_proj above); MLP biases are matched first below
    ("_norm.weight", "qk_norm"),
    ("feedforward_layernorm.weight", "sandwich_norms"),
    ("_proj.weight", "lp_projections"),  # q_proj/k_proj/v_proj/gate_proj/up_proj against qkv_proj/gate_up_proj
)
# ... and the keys that decide its shape.
_SHAPE_KEYS = (
    ("self_attn.qkv_proj.", "num_attention_heads and num_key_value_heads"),
    ("self_attn.k_proj.", "num_key_value_heads"),
    ("self_attn.v_proj.", "num_key_value_heads"),
    ("self_attn.q_proj.", "num_attention_heads"),
    ("self_attn.o_proj.", "num_attention_heads"),
    ("mlp.", "intermediate_size"),
    ("_norm.weight", "head_dim"),
    ("embed_tokens.weight", "vocab_size and hidden_size"),
    ("lm_head.weight", "vocab_size and hidden_size"),
)


def _key_for(name: str, table) -> str | None:
    if table is _PRESENCE_KEYS and ".mlp." in name and name.endswith(".bias"):
        return "mlp_bias"
    return next((key for suffix, key in table if suffix in name), None)


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit() else None


def expected_export_tensors(config, folder="") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the modeling file builds for CONFIG (an LPConfig), as a checkpoint stores them
    (a tied lm_head not at all). LPError when the config does not build a model."""
    import copy

    from .modeling.modeling_lpconvert import LPForCausalLM
    from .quiet import first_line, quiet_transformers

    try:
        with torch.device("meta"), quiet_transformers():
            model = LPForCausalLM(copy.deepcopy(config))
    except Exception as exc:  # whatever a hand-edited value makes the model code raise
        cause = f"it names an unknown {exc}" if isinstance(exc, KeyError) else first_line(exc)  # ACT2FN, rope types
        raise LPError(f"{folder}/config.json does not build a model: {cause}", REEXPORT) from None
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def check_export_config(folder, raw: dict, config, infos) -> None:
    """Refuse an lpconvert export whose config.json no longer describes its weights (`infos`: name -> TensorInfo),
    before anything is loaded: a tensor the config asks for that the checkpoint lacks, or holds that the config
    has no place for (which loading would re-initialise or drop), one of another shape, or a pair head order
    (lp_head_chunks) other than the one the weights were written in. One line naming the key that decides it."""
    where = f"{folder}/config.json does not match the weights"  # then (key): what differs
    expected = expected_export_tensors(config, folder)
    stored = {name: tuple(info.shape) for name, info in infos.items()}
    for names, side in ((expected.keys() - stored.keys(), "the checkpoint has no {name}"),
                        (stored.keys() - expected.keys(), "the checkpoint holds {name}, which the config has no place for")):
        if names:
            name = min(names, key=lambda n: (_block_of(n) or 0, n))
            key = _key_for(name, _PRESENCE_KEYS)
            if (block := _block_of(name)) is not None and block >= len(config.lp_blocks):
                key = "lp_blocks"
            raise LPError(f"{where} ({key or 'lp_blocks'}): {side.format(name=name)}", REEXPORT)
    wrong = [name for name in expected if expected[name] != stored[name]]
    stacked = [name for name in wrong if config.sandwich_norms and len(stored[name]) == 3
               and name.endswith(("o_proj.weight", "down_proj.weight"))]
    if stacked:  # a Gemma 3 pair's branch projections as lpconvert wrote them before issue 34
        raise LPError(f"{folder} stores its pairs' {stacked[0]} as {list(stored[stacked[0]])} (the branches "
                      f"stacked), the layout lpconvert wrote before 2026-12-06; it now writes {list(expected[stacked[0]])}",
                      "re-export the model with this lpconvert; transformers still loads this export with the "
                      "modeling file it ships")
    if wrong:
        blocks = {_block_of(name) for name in wrong}
        some_blocks = None not in blocks and len(blocks) < len(config.lp_blocks)
        key = "lp_blocks" if some_blocks else (_key_for(wrong[0], _SHAPE_KEYS) or "hidden_size")
        raise LPError(f"{where} ({key}): {wrong[0]} is {list(stored[wrong[0]])} in the checkpoint but "
                      f"{list(expected[wrong[0]])} by the config", REEXPORT)
    kv_heads = raw.get("num_key_value_heads") or raw.get("num_attention_heads")  # one layer's (the config's are per block)
    units = kv_heads if config.qk_norm and not config.sandwich_norms else 1
    if config.lp_projections == "separate" and raw.get("lp_head_chunks") != units:
        value = json.dumps(raw["lp_head_chunks"]) if "lp_head_chunks" in raw else "missing"
        raise LPError(f"{folder}/config.json: lp_head_chunks is {value}, but the heads of this model's pairs are "
                      f"stored in {units} unit{'s' if units > 1 else ''} per half", REEXPORT)


# ----------------------------------------------------------------------------------------------
# The files an export ships: recorded at export (config.json `lp_files`), checked when it is read back


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def shipped_files(folder: Path, names) -> dict[str, str]:
    """config.json's `lp_files`: the sha256 of each file NAMES of FOLDER (the model code, the tokenizer)."""
    return {name: file_sha256(folder / name) for name in names}


def check_shipped_files(folder: Path, config, tokenizer_files) -> None:
    """Refuse an export that users cannot load as lpconvert wrote it. lpconvert runs its own copy of the model code,
    never the folder's, so without this check eval would pass a folder whose modeling_lpconvert.py is missing or
    edited, or whose tokenizer is gone: the code files must be present and byte for byte what the export wrote
    (`lp_files`; exports from before the record: present), and a tokenizer must be there if the export wrote one.
    A tokenizer re-saved by transformers (after a fine-tune) rewrites its files: it is checked by loading it,
    where it is used, not by its bytes."""
    recorded = getattr(config, "lp_files", None)
    if not isinstance(recorded, dict):
        recorded = dict.fromkeys(MODELING_FILES) if getattr(config, "lpconvert_version", None) else {}
    fix = "re-export the model with lpconvert, or put back the files it wrote"
    for name in MODELING_FILES:
        if name not in recorded:
            continue
        path = Path(folder) / name
        if not path.is_file():
            raise LPError(f"{folder} has no {name}: transformers cannot load this export as shipped", fix)
        if recorded[name] is not None and file_sha256(path) != recorded[name]:
            raise LPError(f"{path} is not the file lpconvert wrote (its sha256 differs from config.json's lp_files): "
                          "lpconvert measures its own copy of the code, not this one", fix)
    wrote_tokenizer = any(name not in MODELING_FILES for name in recorded)
    if wrote_tokenizer and not any((Path(folder) / name).is_file() for name in tokenizer_files):
        raise LPError(f"{folder} has no tokenizer files, though lpconvert wrote {', '.join(sorted(set(recorded) - set(MODELING_FILES)))}: "
                      "users cannot load this export as shipped", fix)
