"""Architecture support as data: one table per architecture.

Each table names every tensor of a checkpoint, mergekit style: the weights before the layers
(embeddings), a decoder layer's tensors (templates on `layer_prefix`) and the weights after them
(final norm, LM head with its tie rule), plus the shapes config.json promises for them. Its rules
say how each output tensor of a block is built from one layer (a copied layer) or from two (a
layer-parallel pair; docs/method.md section 2):

- `norm`:  the layer's norm weight; copied for one layer, ones for a pair (folded into `rows`).
- `rows`:  source matrices concatenated along the OUTPUT dimension, layer by layer ([q_a, q_b]); for
           a pair each layer's norm weight `fold` is multiplied into the columns first, in float32.
- `cols`:  concatenated along the INPUT dimension (o_proj, down_proj): the matmul sums both halves (with sandwich
           post-norms the model multiplies each half's columns by its own inputs and keeps the products apart).
- `sum`:   added (biases after a `cols` matrix: Attn_a + Attn_b carries both biases).
- `stack`: one row per layer (per-head q/k norms: each half keeps its own weight).
- `branches`: each layer's tensor kept whole, stacked on a new first dimension: a pair whose outputs are
           normed before they are summed (Gemma 3's "sandwich" post-norms) keeps its post-norms (and output
           biases) apart, one branch each, and sums after the post-norms (docs/method.md section 2).

A `heads` rule holds attention heads (rows of q/k/v, columns of o_proj). Where an architecture has per-head
q/k norms, a pair's heads alternate in units (`Architecture.head_units`: one GQA group), a's unit then
b's, so that tensor parallelism, which cuts whole units, leaves each head with its own half's norm.

A new architecture is a new table here, not new branches in the export code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LPError

LAYER_PREFIX = "model.layers.{}."  # a decoder layer's tensors, in the Llama family and in every export
INPUT_NORM = "input_layernorm.weight"
POST_NORM = "post_attention_layernorm.weight"
PRE_FF_NORM = "pre_feedforward_layernorm.weight"
POST_FF_NORM = "post_feedforward_layernorm.weight"


@dataclass(frozen=True)
class Rule:
    """How one output tensor of a block is built from the source layers' tensors."""

    out: str  # name inside the exported block, relative to "model.layers.{block}."
    kind: str  # norm | rows | cols | sum | stack | branches
    parts: tuple[str, ...]  # source tensor names, relative to layer_prefix ("model.layers.{layer}.")
    fold: str | None = None  # norm folded into the columns of `rows` (pairs only)
    when: str | None = None  # LPConfig flag that must be true for the tensor to exist
    heads: bool = False  # rows (or columns, for `cols`) are attention heads: a pair's in unit order


_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"

# The pre-norm Llama family (Llama, Mistral, Qwen2, Qwen3) shares one layer layout; the flags of each
# architecture's table switch the optional tensors on. An export keeps Llama's tensor names, which tensor
# parallelism (transformers' plans, vLLM) knows how to shard.
LLAMA_FAMILY_RULES = (
    Rule(INPUT_NORM, "norm", (INPUT_NORM,)),
    *(Rule(f"{proj}.weight", "rows", (f"{proj}.weight",), fold=INPUT_NORM, heads=True) for proj in (_Q, _K, _V)),
    *(Rule(f"{proj}.bias", "rows", (f"{proj}.bias",), when="attention_bias", heads=True) for proj in (_Q, _K, _V)),
    Rule("self_attn.q_norm.weight", "stack", ("self_attn.q_norm.weight",), when="qk_norm"),
    Rule("self_attn.k_norm.weight", "stack", ("self_attn.k_norm.weight",), when="qk_norm"),
    Rule(f"{_O}.weight", "cols", (f"{_O}.weight",), heads=True),
    Rule(f"{_O}.bias", "sum", (f"{_O}.bias",), when="attention_out_bias"),
    Rule(POST_NORM, "norm", (POST_NORM,)),
    *(Rule(f"mlp.{proj}.weight", "rows", (f"mlp.{proj}.weight",), fold=POST_NORM) for proj in ("gate_proj", "up_proj")),
    *(Rule(f"mlp.{proj}.bias", "rows", (f"mlp.{proj}.bias",), when="mlp_bias") for proj in ("gate_proj", "up_proj")),
    Rule("mlp.down_proj.weight", "cols", ("mlp.down_proj.weight",)),
    Rule("mlp.down_proj.bias", "sum", ("mlp.down_proj.bias",), when="mlp_bias"),
)


# Gemma 3: four norms per layer. The input and pre-feed-forward norms fold into the projections that read them; the
# post-attention and post-feed-forward norms act on each layer's own output, so a pair keeps its two branches apart
# until after the post-norms: o_proj and down_proj are [a | b] columns as any pair's (the model computes each half's
# product on its own), the post-norms one row per branch ("branches").
GEMMA3_RULES = (
    Rule(INPUT_NORM, "norm", (INPUT_NORM,)),
    *(Rule(f"{proj}.weight", "rows", (f"{proj}.weight",), fold=INPUT_NORM, heads=True) for proj in (_Q, _K, _V)),
    *(Rule(f"{proj}.bias", "rows", (f"{proj}.bias",), when="attention_bias", heads=True) for proj in (_Q, _K, _V)),
    Rule("self_attn.q_norm.weight", "stack", ("self_attn.q_norm.weight",)),
    Rule("self_attn.k_norm.weight", "stack", ("self_attn.k_norm.weight",)),
    Rule(f"{_O}.weight", "cols", (f"{_O}.weight",)),
    Rule(f"{_O}.bias", "branches", (f"{_O}.bias",), when="attention_out_bias"),
    Rule(POST_NORM, "branches", (POST_NORM,)),
    Rule(PRE_FF_NORM, "norm", (PRE_FF_NORM,)),
    *(Rule(f"mlp.{proj}.weight", "rows", (f"mlp.{proj}.weight",), fold=PRE_FF_NORM) for proj in ("gate_proj", "up_proj")),
    Rule("mlp.down_proj.weight", "cols", ("mlp.down_proj.weight",)),
    Rule(POST_FF_NORM, "branches", (POST_FF_NORM,)),
)


@dataclass(frozen=True)
class LayerNorms:
    """Which norm of a source layer does what (module names): the two input norms, and the output norms a
    sandwich layer applies to its attention and MLP outputs before the residual (None: there are none)."""

    attention_input: str = "input_layernorm"
    mlp_input: str = "post_attention_layernorm"
    attention_output: str | None = None
    mlp_output: str | None = None

    @property
    def sandwich(self) -> bool:
        return self.attention_output is not None


PRE_NORM_LAYER = LayerNorms()
SANDWICH_LAYER = LayerNorms("input_layernorm", "pre_feedforward_layernorm",
                            "post_attention_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Weight:
    """A tensor outside the decoder layers, copied unchanged under its own name."""

    name: str
    # The tensor the model reuses in its place when the config's tie_word_embeddings is true (then this
    # one is not written, and the checkpoint need not hold it).
    tied_to: str | None = None


# Before the layers, the embeddings; after them, the final norm and the LM head (the embedding matrix
# itself when the embeddings are tied).
LLAMA_FAMILY_PRE_WEIGHTS = (Weight("model.embed_tokens.weight"),)
LLAMA_FAMILY_POST_WEIGHTS = (Weight("model.norm.weight"),
                             Weight("lm_head.weight", tied_to="model.embed_tokens.weight"))

# The shapes config.json promises (a config with missing fields gets transformers' defaults, e.g.
# hidden_size 4096, which would write a broken model): tensor name, "{}" standing for layer 0 ->
# one size per dimension, each a product or quotient of config fields ("a * b", "a // b").
LLAMA_FAMILY_SHAPES = {
    "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
    LAYER_PREFIX + f"{_Q}.weight": ("num_attention_heads * head_dim", "hidden_size"),
    LAYER_PREFIX + f"{_K}.weight": ("num_key_value_heads * head_dim", "hidden_size"),
    LAYER_PREFIX + "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
}
# Size fields a config may leave out (or set to 0/None), and what they are then.
SIZE_FALLBACKS = {"num_key_value_heads": "num_attention_heads", "head_dim": "hidden_size // num_attention_heads"}


# The widths an export declares per block (its config's per_layer_config); the global value of one is ambiguous
# to transformers, which refuses to read it.
PER_BLOCK_WIDTHS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def one_layer_value(config, name: str):
    """A config value as one source layer has it, or None. An export's config (LPConfig) knows one layer's widths
    (its blocks' differ)."""
    if name in PER_BLOCK_WIDTHS and hasattr(config, "layer_widths"):
        return config.layer_widths()[PER_BLOCK_WIDTHS.index(name)]
    return getattr(config, name, None)


def block_widths(config, blocks: list[list[int]]) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) of each block of source layers: one layer's times the layers it holds
    (LPConfig.block_widths, the exported model's own rule)."""
    layer = [config_size(config, name) for name in PER_BLOCK_WIDTHS]
    return [tuple(len(block) * width for width in layer) for block in blocks]


def config_size(config, expression: str) -> int:
    """The value of a size expression of `shapes` ("num_attention_heads * head_dim") for this config."""
    def value(name: str) -> int:
        found = one_layer_value(config, name)
        if not found and name in SIZE_FALLBACKS:
            return config_size(config, SIZE_FALLBACKS[name])
        return found

    words = expression.split()
    result = value(words[0])
    for op, name in zip(words[1::2], words[2::2], strict=True):
        result = result * value(name) if op == "*" else result // value(name)
    return result


@dataclass(frozen=True)
class Architecture:
    """What lpconvert knows about one Hugging Face architecture."""

    name: str
    model_type: str
    hf_class: str
    rules: tuple[Rule, ...]
    # Tensor names (the Llama family's by default): the weights before and after the decoder layers,
    # the prefix of a layer's tensors, the shapes config.json promises, the one tensor every layer has
    # (counting it counts the layers), and suffixes of non-weight buffers some old checkpoints saved
    # (recomputed by the model, never exported).
    pre_weights: tuple[Weight, ...] = LLAMA_FAMILY_PRE_WEIGHTS
    post_weights: tuple[Weight, ...] = LLAMA_FAMILY_POST_WEIGHTS
    layer_prefix: str = LAYER_PREFIX
    shapes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_FAMILY_SHAPES))
    layer_marker: str = INPUT_NORM
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # LPConfig flags: True/False, or the source config field that holds the value.
    attention_bias: bool | str = False  # q/k/v biases
    attention_out_bias: bool | str = False  # o_proj bias
    mlp_bias: bool | str = False
    qk_norm: bool = False
    # The layer's norms (runner.LayerRunner reads them by name), and what each norm scales by: its weight
    # (offset 0) or 1 + its weight (Gemma: offset 1, computed in float32 and rounded once).
    norms: LayerNorms = PRE_NORM_LAYER
    norm_offset: float = 0.0
    # Gemma: the embeddings are multiplied by sqrt(hidden_size); attention scales by query_pre_attn_scalar ** -0.5.
    scaled_embeddings: bool = False
    query_scale_field: str | None = None
    activation_field: str = "hidden_act"  # the config field naming the MLP's activation
    # Config fields that must hold these values for the export to be exact (what the exported model does not
    # implement: Gemma's logit soft-capping, bidirectional attention).
    required_values: Mapping[str, Any] = field(default_factory=dict)
    # Source config fields that an exported config needs (checked before anything is written).
    required_fields: tuple[str, ...] = field(
        default=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "vocab_size", "rms_norm_eps")
    )
    # How transformers' config class of this architecture fills what config.json leaves out, so that
    # lpconvert can read the file without importing transformers (see `read_source_config`):
    # field defaults, whether a missing head_dim means hidden_size // num_attention_heads, and the
    # field that switches sliding-window attention on (Qwen: from layer `max_window_layers` on).
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    head_dim_from_heads: bool = True
    sliding_window_switch: str | None = None
    layer_pattern_field: str | None = None  # Gemma: every n-th layer is global, the others local (default 6)

    def flags(self, config) -> dict[str, bool]:
        def read(value):
            return bool(getattr(config, value, False)) if isinstance(value, str) else value

        return {
            "attention_bias": read(self.attention_bias),
            "attention_out_bias": read(self.attention_out_bias),
            "mlp_bias": read(self.mlp_bias),
            "qk_norm": self.qk_norm,
        }

    def head_units(self, config) -> int:
        """Units per half in which a pair's heads alternate (archs.Rule.heads): one per KV head (a GQA group) where
        the halves' per-head q/k norms differ; else 1, all of a's heads then b's (tensor parallelism of 2 then
        runs layer a on one rank and layer b on the other, the layer-parallel scheme). A sandwich pair keeps its
        branches apart through o_proj, which reads each half's heads whole: 1."""
        return config_size(config, "num_key_value_heads") if self.qk_norm and not self.norms.sandwich else 1

    def model_fields(self, config) -> dict[str, Any]:
        """What the exported config.json says about the layer's arithmetic beyond the Llama family's."""
        return {
            "hidden_act": getattr(config, self.activation_field, None) or "silu",
            "norm_offset": self.norm_offset,
            "sandwich_norms": self.norms.sandwich,
            "embed_scale": config.hidden_size ** 0.5 if self.scaled_embeddings else None,
            "query_pre_attn_scalar": getattr(config, self.query_scale_field) if self.query_scale_field else None,
        }

    def active_rules(self, config) -> tuple[Rule, ...]:
        flags = self.flags(config)
        return tuple(rule for rule in self.rules if rule.when is None or flags[rule.when])

    def layer_tensor_names(self, config) -> list[str]:
        """Every source tensor name of one decoder layer (relative to its prefix)."""
        names: list[str] = []
        for rule in self.active_rules(config):
            names += [p for p in rule.parts if p not in names]
        return names

    def expected_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """Tensor name (layer 0) -> the shape this config implies for it, in table order."""
        return {name.format(0): tuple(config_size(config, size) for size in sizes)
                for name, sizes in self.shapes.items()}


# The defaults of transformers 5's config classes (tests/test_archs.py checks them against the
# installed classes, so a transformers release that changes one fails a test, not an export).
_COMMON_DEFAULTS = dict(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096, hidden_act="silu",
                        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0, use_cache=True,
                        initializer_range=0.02, pad_token_id=None,
                        output_attentions=False, output_hidden_states=False)  # every transformers config's
_LLAMA_DEFAULTS = dict(_COMMON_DEFAULTS, vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048,
                       attention_bias=False, mlp_bias=False, pretraining_tp=1, bos_token_id=1, eos_token_id=2)
_MISTRAL_DEFAULTS = dict(_COMMON_DEFAULTS, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                         max_position_embeddings=4096 * 32, sliding_window=4096, bos_token_id=1, eos_token_id=2)
_QWEN2_DEFAULTS = dict(_COMMON_DEFAULTS, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                       max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                       max_window_layers=28, bos_token_id=None, eos_token_id=None)
_QWEN3_DEFAULTS = dict(_QWEN2_DEFAULTS, head_dim=128, attention_bias=False)
_GEMMA3_DEFAULTS = dict({k: v for k, v in _COMMON_DEFAULTS.items() if k != "hidden_act"}, vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
                        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None, use_bidirectional_attention=False)
_GEMMA3_EXACT = {"final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False}

ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("Llama", "llama", "LlamaForCausalLM", LLAMA_FAMILY_RULES,
                     attention_bias="attention_bias", attention_out_bias="attention_bias", mlp_bias="mlp_bias",
                     config_defaults=_LLAMA_DEFAULTS),
        Architecture("Mistral", "mistral", "MistralForCausalLM", LLAMA_FAMILY_RULES,
                     config_defaults=_MISTRAL_DEFAULTS),
        Architecture("Qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_FAMILY_RULES, attention_bias=True,
                     config_defaults=_QWEN2_DEFAULTS, head_dim_from_heads=False,
                     sliding_window_switch="use_sliding_window"),
        Architecture("Qwen3", "qwen3", "Qwen3ForCausalLM", LLAMA_FAMILY_RULES,
                     attention_bias="attention_bias", attention_out_bias="attention_bias", qk_norm=True,
                     config_defaults=_QWEN3_DEFAULTS, sliding_window_switch="use_sliding_window"),
        # Gemma 3's text models (270M, 1B; the larger ones' language_model as a text-only checkpoint).
        Architecture("Gemma3", "gemma3_text", "Gemma3ForCausalLM", GEMMA3_RULES,
                     attention_bias="attention_bias", attention_out_bias="attention_bias", qk_norm=True,
                     norms=SANDWICH_LAYER, norm_offset=1.0, scaled_embeddings=True,
                     query_scale_field="query_pre_attn_scalar", activation_field="hidden_activation",
                     required_values=_GEMMA3_EXACT, config_defaults=_GEMMA3_DEFAULTS, head_dim_from_heads=False,
                     layer_pattern_field="sliding_window_pattern"),
    )
}

SUPPORTED = ", ".join(f"{a.name} ({a.model_type})" for a in ARCHITECTURES.values())


_CONVERT_SUPPORTED = "convert a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text) causal LM"


def _unsupported(config) -> tuple[str, str] | None:
    """(why lpconvert cannot convert this config, what to do instead), or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"architecture '{model_type}' is not supported; supported: {SUPPORTED}", _CONVERT_SUPPORTED
    arch = ARCHITECTURES[model_type]
    missing = [f for f in arch.required_fields if getattr(config, f, None) is None]
    if missing:
        return f"config.json lacks {', '.join(missing)}, which {arch.name} needs", _CONVERT_SUPPORTED
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        return (f"the checkpoint is quantized ({method or 'unknown method'}); norms fold only into "
                "full-precision weights", "convert the unquantized (bf16/fp16/fp32) checkpoint")
    activation = getattr(config, arch.activation_field, None) or "silu"
    if activation not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        return f"activation '{activation}' is not supported", _CONVERT_SUPPORTED
    for name, wanted in arch.required_values.items():
        if (getattr(config, name, wanted) or None) != (wanted or None):  # None and False alike: not set
            return (f"config.json sets {name} to {getattr(config, name)!r}, which the layer-parallel model does not "
                    f"implement ({arch.name} exports need {wanted!r})", _CONVERT_SUPPORTED)
    return None


def unsupported_reason(config) -> str | None:
    """Why lpconvert cannot convert this config, or None when it can."""
    problem = _unsupported(config)
    return problem[0] if problem else None


def architecture_for(config) -> Architecture:
    problem = _unsupported(config)
    if problem:
        raise LPError(*problem)
    return ARCHITECTURES[config.model_type]


class SourceConfig:
    """A source config.json read as transformers' config class would read it, without transformers.

    Importing transformers' config machinery costs an export about 1.6 s of start-up; the fields an
    export reads are few, and their defaults are the architecture's table (`config_defaults`).
    Attribute access like a transformers config; `to_dict()` gives every field.
    """

    def __init__(self, fields: dict[str, Any]):
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reads_without_transformers(raw: dict) -> bool:
    """Whether `read_source_config` can read this config.json (a table architecture, no custom code)."""
    return raw.get("model_type") in ARCHITECTURES and "auto_map" not in raw


def _number(value, kind=(int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


# What transformers' config validation would refuse, checked here as it is not run: field -> (test, wanted).
_FIELD_CHECKS = {
    **{name: (lambda v: _number(v, int) and v > 0, "a positive integer")
       for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size")},
    "max_window_layers": (lambda v: _number(v, int) and v >= 0, "a non-negative integer"),
    "rms_norm_eps": (lambda v: _number(v) and v > 0, "a positive number"),
}


def read_source_config(raw: dict) -> SourceConfig:
    """config.json as transformers would read it (LPError for a size or epsilon it would refuse)."""
    arch = ARCHITECTURES[raw["model_type"]]
    fields = {**arch.config_defaults, **raw}
    for name, (valid, wanted) in _FIELD_CHECKS.items():
        if fields.get(name) is not None and not valid(fields[name]):
            raise LPError(f"config.json: {name} is {fields[name]!r}, not {wanted}", "fix or re-download config.json")
    if "dtype" not in fields and "torch_dtype" in fields:  # the name before transformers 5
        fields["dtype"] = fields.pop("torch_dtype")
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if arch.head_dim_from_heads and fields.get("head_dim") is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if arch.layer_pattern_field and fields.get("layer_types") is None:
        every = fields.get(arch.layer_pattern_field) or 6
        fields["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                 for i in range(fields["num_hidden_layers"])]
    if arch.sliding_window_switch:
        if not fields.get(arch.sliding_window_switch):
            fields["sliding_window"] = None
        if fields.get("layer_types") is None:
            sliding_from = fields["max_window_layers"] if fields["sliding_window"] is not None else None
            fields["layer_types"] = ["sliding_attention" if sliding_from is not None and i >= sliding_from
                                     else "full_attention" for i in range(fields["num_hidden_layers"])]
    return SourceConfig(fields)


def layer_types_of(config) -> list[str]:
    """Attention type of each source layer (full or sliding window)."""
    num_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None)
    return ["sliding_attention" if sliding else "full_attention"] * num_layers


def rope_parameters_of(config) -> dict:
    """The rotary settings as transformers 5 names them (rope_parameters), also from an older config's
    rope_scaling and rope_theta. Gemma 3 has one set per attention type ({"full_attention": {...}, ...})."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return {key: dict(value) if isinstance(value, Mapping) else value for key, value in params.items()}
    if getattr(config, "model_type", None) == "gemma3_text":  # transformers' defaults for a config without them
        return {"full_attention": {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 1e6)},
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": getattr(config, "rope_local_base_freq", 1e4)}}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))  # transformers keeps "type" too
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


ATTENTION_TYPES = ("full_attention", "sliding_attention")


def rope_by_layer_type(config) -> dict[str, dict] | None:
    """{attention type: rotary settings} where each type has its own (Gemma 3: local and global bases), else None."""
    params = rope_parameters_of(config)
    if params and set(params) <= set(ATTENTION_TYPES) and all(isinstance(v, Mapping) for v in params.values()):
        return params
    return None


def unpairable_starts(config) -> list[int]:
    """Pair starts p whose layers p and p + 1 differ in attention type (a local and a global layer): their
    masks and rotary bases differ, so they cannot share one block."""
    types = layer_types_of(config)
    return [p for p in range(len(types) - 1) if types[p] != types[p + 1]]
