"""What `lpconvert inspect MODEL` reports: a JSON-ready description of a source (render.py draws its table)."""

from __future__ import annotations

from typing import Any

from . import archs
from .sources import ModelSource


def describe_model(source: ModelSource) -> dict[str, Any]:
    """Architecture, shapes, weight dtype, size and support status of a model (JSON-serialisable)."""
    config = source.config
    architectures = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    heads = archs.one_layer_value(config, "num_attention_heads")  # an export's widths are per block
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if source.kind == "lpconvert":
        reason = "already a layer-parallel checkpoint exported by lpconvert; convert the original model instead"
    else:
        reason = archs.unsupported_reason(config)
    lp_blocks = getattr(config, "lp_blocks", None) if source.kind == "lpconvert" else None

    info: dict[str, Any] = {
        "name": source.name,
        "kind": source.kind,
        "path": str(source.path),
        "architecture": architectures[0] if architectures else model_type,
        "model_type": model_type,
        "supported": reason is None,
        "unsupported_reason": reason,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": archs.one_layer_value(config, "num_key_value_heads") or heads,
        "head_dim": head_dim,
        "intermediate_size": archs.one_layer_value(config, "intermediate_size"),
        "vocab_size": getattr(config, "vocab_size", None),
        "dtype": weights_dtype(source),
        "parameters": parameter_count(source),
        "disk_bytes": source.disk_bytes(),
        "tie_word_embeddings": tied,
    }
    types = archs.layer_types_of(config) if reason is None and source.kind != "lpconvert" else []
    if len(set(types)) > 1:  # local (sliding-window) and global layers: a pair joins two of one kind
        info["global_layers"] = [i for i, kind in enumerate(types) if kind == "full_attention"]
        info["sliding_window"] = getattr(config, "sliding_window", None)
        info["unpairable_starts"] = archs.unpairable_starts(config)
    if lp_blocks is not None:
        blocks = [[int(i) for i in block] for block in lp_blocks]
        info["lp_blocks"] = blocks
        info["num_layers"] = sum(len(block) for block in blocks)  # source layers held
        info["effective_depth"] = len(blocks)  # blocks the model runs
    return info


def weights_dtype(source: ModelSource) -> str | None:
    """The floating dtype holding most of the weights, like "float32" or "bfloat16"."""
    dtype = source.store.main_dtype()
    return str(dtype).removeprefix("torch.") if dtype else None


def parameter_count(source: ModelSource) -> int:
    """Sum of numel over the stored tensors; a tied lm_head counts once (as the embedding)."""
    infos = source.store.infos()
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    return sum(_numel(info.shape) for name, info in infos.items()
               if not (tied and name == "lm_head.weight" and "model.embed_tokens.weight" in infos))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
