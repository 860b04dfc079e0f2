"""What an export says about itself: its config.json and its model card (README.md).

The config is the source's with the blocks of the plan: the LPConfig that lpconvert's modeling file
(lpconvert/modeling/) runs the blocks with, on disk (`export`) or in memory (`convert_in_memory`).
"""

from __future__ import annotations

import json

import torch

from . import __version__
from .archs import PER_BLOCK_WIDTHS, Architecture, config_size, layer_types_of, rope_parameters_of
from .errors import LPError
from .formats import Plan

PLAN_FILE = "lpconvert-plan.json"


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
    """The exported model's config.json (LPConfig): the source's config with the blocks of the plan."""
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
        "rope_parameters": rope_parameters_of(config),
        "sliding_window": getattr(config, "sliding_window", None) if "sliding_attention" in types else None,
        "layer_types": types,
        "lp_blocks": blocks,
        "per_layer_config": _wide_block_widths(config, blocks),
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


def _wide_block_widths(config, blocks: list[list[int]]) -> dict[str, dict[str, int]]:
    """What a reader of one block's widths needs (vLLM sizes each block's attention and KV cache by it): the
    widths of every block of more than one layer. LPConfig derives the same from lp_blocks and refuses a
    config.json where the two disagree."""
    one_layer = {name: config_size(config, name) for name in PER_BLOCK_WIDTHS}
    return {str(i): {name: len(layers) * value for name, value in one_layer.items()}
            for i, layers in enumerate(blocks) if len(layers) > 1}


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

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)  # config.json has auto_map{plain_tokenizer}
```

The plan that produced it is in `{PLAN_FILE}`.
"""
