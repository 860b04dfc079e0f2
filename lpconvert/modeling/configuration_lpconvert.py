"""Configuration of a layer-parallel checkpoint written by lpconvert.

This file is copied, unchanged, into every exported checkpoint. It imports only json and transformers, and
every model-specific value lives in config.json, never in this code.

`num_hidden_layers` counts the *blocks* the model runs (its effective depth). `lp_blocks` says
which source layers each block holds: `[5]` is a copied layer, `[6, 7]` a layer-parallel pair run
as one wide layer (2x heads, 2x KV heads, 2x MLP width, norm weights folded into the projections).
Head counts and `intermediate_size` are those of ONE source layer; a block of h layers has h times
as many, which `per_layer_config` declares (transformers 5.14 and later) for whoever reads a layer's
widths: vLLM sizes each block's attention and KV cache from it, and tensor parallelism shards by it.
It is derived from `lp_blocks`, the one source of truth, and not written to config.json (transformers' own config
classes refuse it); a config.json that still declares other widths is refused.

config.json's `model_type` is the source's ("llama", "gemma3_text", ...), from `lp_source`: AutoTokenizer and
AutoConfig know that type and so need not ask whether to run this folder's code, while `auto_map` still loads
LPConfig and the model with `trust_remote_code=True`. In Python an LPConfig's model_type stays "lpconvert".
"""

import json

from transformers import PretrainedConfig

# transformers 5.14 and later declare per-layer widths (HeterogeneousConfigMixin); earlier ones would keep
# per_layer_config as a plain attribute, and the modeling file then derives the widths from lp_blocks.
_HETEROGENEOUS = hasattr(PretrainedConfig, "is_heterogeneous")


def _as_int_keys(declared) -> dict | None:
    """{"1": {...}} as {1: {...}}; None when `declared` is not a mapping of block indices to mappings."""
    try:
        return {int(i): dict(values) for i, values in declared.items()}
    except (AttributeError, TypeError, ValueError):
        return None


# Llama's plans: which projections tensor parallelism cuts by output rows (heads, MLP rows) and by input columns,
# and what a pipeline stage hands the next. A pair's halves are whole heads, so they shard like any heads.
TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
QK_NORM_TP_PLAN = {  # per-head norms: every rank holds both halves' weights (its heads are whole units of both)
    "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
}
PP_PLAN = {
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "norm": (["hidden_states"], ["hidden_states"]),
}


# What a config.json edited by hand can get wrong in ways the model would only fail on later (a shape error, a
# division by zero) or not at all: refused here, naming the key (ValueError).


def _check_blocks(blocks) -> None:
    """lp_blocks: [i] (a copied layer) or [i, i+1] (a pair), the source's layers 0, 1, 2, ... each once, in order."""
    layers = [layer for block in blocks for layer in block] if _is_list(blocks) and all(map(_is_list, blocks)) \
        else None
    if not blocks or layers is None or not all(1 <= len(block) <= 2 for block in blocks) \
            or any(type(layer) is not int for layer in layers) or layers != list(range(len(layers))):
        raise ValueError(f"config.json: lp_blocks {_shown(blocks)} is not a list of blocks, each [i] (a layer) or "
                         "[i, i+1] (a pair), that hold the layers 0, 1, 2, ... in order")


def _check_heads(num_heads, num_kv_heads, head_chunks) -> None:
    for key, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                       ("lp_head_chunks", head_chunks)):
        if type(value) is not int or value < 1:
            raise ValueError(f"config.json: {key} is {_shown(value)}, not a positive integer")
    if num_heads % num_kv_heads:
        raise ValueError(f"config.json: num_key_value_heads {num_kv_heads} does not divide num_attention_heads "
                         f"{num_heads}")
    if num_kv_heads % head_chunks:
        raise ValueError(f"config.json: lp_head_chunks {head_chunks} does not divide num_key_value_heads "
                         f"{num_kv_heads} (a pair's heads come in lp_head_chunks units per half, whole KV groups)")


def _check_layer_types(layer_types, blocks: int) -> None:
    if not _is_list(layer_types) or len(layer_types) != blocks \
            or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"config.json: layer_types {_shown(layer_types)} is not one of full_attention or "
                         f"sliding_attention for each of the {blocks} blocks of lp_blocks")


def _check_choice(key: str, value, choices: tuple) -> None:
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(f"config.json: {key} is {_shown(value)}, not one of {', '.join(map(_shown, choices))}")


def _shown_widths(widths) -> str:
    """Per-block widths as {"block": [heads, KV heads, MLP width]}, or as they are when they are no such thing."""
    try:
        return _shown({str(i): [w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]]
                       for i, w in _as_int_keys(widths).items()})
    except (AttributeError, KeyError, TypeError):
        return _shown(widths)


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def _shown(value) -> str:
    """A value as config.json writes it, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class LPConfig(PretrainedConfig):
    model_type = "lpconvert"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    base_model_tp_plan = TP_PLAN
    base_model_pp_plan = PP_PLAN

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        rope_parameters=None,
        attention_bias=False,
        attention_out_bias=False,
        mlp_bias=False,
        qk_norm=False,
        norm_offset=0.0,
        sandwich_norms=False,
        embed_scale=None,
        query_pre_attn_scalar=None,
        attention_dropout=0.0,
        sliding_window=None,
        layer_types=None,
        lp_blocks=None,
        lp_projections=None,
        lp_head_chunks=1,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        num_key_value_heads = num_key_value_heads or num_attention_heads
        _check_heads(num_attention_heads, num_key_value_heads, lp_head_chunks)  # before any division by them
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias  # biases on q/k/v
        self.attention_out_bias = attention_out_bias  # bias on o_proj
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
        self.norm_offset = norm_offset  # norms scale by norm_offset + weight (Gemma: 1)
        self.sandwich_norms = sandwich_norms  # post-attention and post-feed-forward norms on each layer's outputs
        self.embed_scale = embed_scale  # embeddings multiplied by this (Gemma: sqrt(hidden_size)); None: not scaled
        self.query_pre_attn_scalar = query_pre_attn_scalar  # attention scales by this ** -0.5; None: head_dim
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.lp_blocks = [[i] for i in range(num_hidden_layers)] if lp_blocks is None else lp_blocks
        _check_blocks(self.lp_blocks)
        self.num_hidden_layers = len(self.lp_blocks)
        # How the checkpoint stores a block's projections: "separate" (q/k/v, gate/up: Llama's names), or "fused"
        # (qkv_proj, gate_up_proj): exports written before the separate layout, whose config.json does not say.
        if lp_projections is None:
            lp_projections = "fused" if "lpconvert_version" in kwargs else "separate"
        _check_choice("lp_projections", lp_projections, ("separate", "fused"))
        self.lp_projections = lp_projections
        # Units per half in which a pair's heads alternate, a's unit then b's (one GQA group each for q/k-norm
        # architectures, so each tensor-parallel shard knows its norms); 1: all of a's heads, then b's.
        self.lp_head_chunks = lp_head_chunks
        _check_choice("sandwich_norms", sandwich_norms, (True, False))
        self.base_model_tp_plan = {**TP_PLAN, **(QK_NORM_TP_PLAN if qk_norm else {})}
        if sandwich_norms and any(len(layers) > 1 for layers in self.lp_blocks):
            # A sandwich pair's o_proj and down_proj keep its branches apart (one [2, hidden] output per token, each
            # half normed before the sum): no plan shards them, so this model declares none (tensor parallelism off)
            self.base_model_tp_plan = {}
        self.layer_types = layer_types or ["full_attention"] * self.num_hidden_layers
        _check_layer_types(self.layer_types, self.num_hidden_layers)
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        kwargs.pop("model_type", None)  # config.json's is the source's (`written_model_type`); this class's stays
        declared = kwargs.pop("per_layer_config", None)  # exports before lpconvert stopped writing it
        # One source layer's widths, kept apart: once per_layer_config is set, a global read of them raises.
        self._layer_widths = (num_attention_heads, num_key_value_heads, intermediate_size)
        widths = self._wide_block_widths()
        if declared is not None and _as_int_keys(declared) != widths:  # None when it is no such mapping
            raise ValueError(f"config.json: per_layer_config {_shown_widths(declared)} does not match lp_blocks and "
                             f"the one-layer widths, which imply {_shown_widths(widths)} (wide blocks as [heads, KV "
                             "heads, MLP width]); remove per_layer_config to have it derived")
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        if widths and _HETEROGENEOUS:  # transformers >= 5.14: vLLM and tensor parallelism read each block's widths
            self.per_layer_config = widths

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """config.json as transformers reads it, an export's model_type taken as this class's: the file carries the
        source's (for AutoTokenizer), which transformers would otherwise warn is not "lpconvert"."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if isinstance(config_dict, dict) and "lp_blocks" in config_dict:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def written_model_type(self) -> str:
        """The model_type config.json gets: the source's, which transformers knows (lp_source; "lpconvert" for a
        config that names no source)."""
        source = getattr(self, "lp_source", None)
        model_type = source.get("model_type") if isinstance(source, dict) else None
        return model_type if isinstance(model_type, str) and model_type else self.model_type

    def _as_written(self, output: dict) -> dict:
        output.pop("per_layer_config", None)  # derived from lp_blocks again on load
        output.pop("_layer_widths", None)
        output["model_type"] = self.written_model_type()
        return output

    def to_dict(self) -> dict:
        return self._as_written(super().to_dict())

    def to_diff_dict(self) -> dict:
        return self._as_written(super().to_diff_dict())

    def layer_widths(self) -> tuple[int, int, int]:
        """(query heads, KV heads, MLP width) of one source layer."""
        return self._layer_widths

    def block_widths(self, block: int) -> tuple[int, int, int]:
        """(query heads, KV heads, MLP width) of a block: one source layer's times the layers it holds. The one place
        an export's widths are worked out: per_layer_config, the modeling file, and lpconvert's vLLM and GGUF
        writers (archs.block_widths) read them here."""
        return tuple(len(self.lp_blocks[block]) * width for width in self.layer_widths())

    def _wide_block_widths(self) -> dict[int, dict[str, int]]:
        """per_layer_config: each wide block's widths (blocks of one layer have the global values)."""
        keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        return {i: dict(zip(keys, self.block_widths(i), strict=True))
                for i, layers in enumerate(self.lp_blocks) if len(layers) > 1}


__all__ = ["LPConfig"]
