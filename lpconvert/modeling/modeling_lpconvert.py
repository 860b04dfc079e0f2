"""A layer-parallel decoder-only LM: the model behind every checkpoint lpconvert exports.

This file is copied, unchanged, into every exported checkpoint; it imports only torch and public
transformers APIs, and every model-specific value lives in config.json. Load it with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The model is a pre-norm Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 checkpoints convert to
it). What is different is the *block*: a block holds one source layer, or a layer-parallel pair of
two consecutive source layers a and b that read the same input and whose updates are summed:

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

With each layer's norm weight folded into the columns of the projections that read it, a pair is a
plain decoder layer with twice the heads, twice the KV heads and twice the MLP width: q/k/v and
gate/up rows of a then b, o_proj and down_proj columns of a then b, unit-weight norms. Query head j
uses KV head j // (n_q / n_kv), so a's queries meet a's keys and b's queries meet b's keys.

The checkpoint stores Llama's projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj) and the forward calls them as Llama does, so tensor parallelism shards them by head with
Llama's plans (transformers' tp_plan="auto", vLLM's Transformers backend, which fuses them itself).
With the natural head order, tensor parallelism of 2 runs layer a on one rank and layer b on the
other, the layer-parallel scheme. Qwen3's per-head q/k norms differ between a and b: its pair heads
are stored in units (`lp_head_chunks` units per half, one GQA group each), a's unit then b's, so a
rank holding whole units knows which norm each head takes.

Gemma 3 checkpoints convert too (`sandwich_norms`): each layer also norms its attention and MLP outputs before
they reach the residual, so a pair keeps its two branches apart until then: o_proj and down_proj hold [a | b]
columns as any pair's, but each half's inputs meet only its own columns (LPBranchLinear), giving a [2, hidden]
output whose rows are normed by their own post-norm (P, Q), then summed:

    h = x + P_a(Attn_a(N1_a(x))) + P_b(Attn_b(N1_b(x)))
    y = h + Q_a(Mlp_a(N2_a(h)))  + Q_b(Mlp_b(N2_b(h)))

Gemma's norms scale by 1 + weight (`norm_offset`), its embeddings by sqrt(hidden_size) (`embed_scale`), its
attention by query_pre_attn_scalar ** -0.5, and its local (sliding-window) and global layers each have their own
rotary base (`rope_parameters` per attention type); a pair joins two layers of the same type.

The modules are the checkpoint's tensors, name for name: `state_dict()` holds exactly what the checkpoint stores
(a tied lm_head aside), so `load_state_dict`, `save_pretrained`, PEFT's target modules (q_proj, ..., down_proj: every
projection is an nn.Linear) and training see the layout on disk; gradient checkpointing recomputes block by block.
Nothing is fused at load: one q/k/v GEMM instead of three measured no faster on the CPU, and vLLM fuses them itself. Exports written before the separate layout store q/k/v as one `qkv_proj` and
gate/up as one `gate_up_proj` (`lp_projections` "fused", or absent from an export's config.json): their blocks have
those.
"""

import copy
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_lpconvert import LPConfig

# transformers 5.x renamed the cache keyword from `past_key_values` to `cache` (and the mask
# builders' `input_embeds` to `inputs_embeds`). Read the installed names once, at import.

_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_PARAMS = inspect.signature(create_causal_mask).parameters
_MASK_CACHE_KW = "cache" if "cache" in _MASK_PARAMS else "past_key_values"
_MASK_EMBEDS_KW = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"


def _pick_cache(cache, past_key_values):
    return cache if cache is not None else past_key_values


def uniform_config(config: LPConfig) -> LPConfig:
    """A config whose widths read globally (block 0's): for code that reads them so, such as transformers' rope
    initialisers (which compute hidden_size // num_attention_heads as a default argument)."""
    return config.per_layer_config[0] if getattr(config, "is_heterogeneous", False) else config


class LPRMSNorm(nn.Module):
    """RMSNorm over the last dimension; `weight` has one row per half for per-head q/k norms and for a sandwich
    pair's post-norms. It scales by `offset + weight`: Llama's norms by the weight, in the input's dtype; Gemma's
    by 1 + weight (offset 1), in float32 and rounded once."""

    def __init__(self, shape, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.offset:
            return (hidden_states * (self.offset + self.weight.float())).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)


class LPHeadRMSNorm(LPRMSNorm):
    """Per-head RMSNorm of q or k (Qwen3). Each half of a pair keeps its own weight: (halves, 1, head_dim).

    A pair's heads come in units of `unit_heads` heads, a's unit then b's, so the heads of any whole
    number of units (a tensor-parallel shard) are viewed as (units, halves, unit_heads) whatever their count.
    """

    def __init__(self, halves: int, unit_heads: int, head_dim: int, eps: float, offset: float = 0.0):
        super().__init__((halves, 1, head_dim), eps, offset)
        self.unit_heads = unit_heads

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        batch, seq, heads, head_dim = states.shape
        halves = self.weight.shape[0]
        normed = super().forward(states.view(batch, seq, -1, halves, self.unit_heads, head_dim))
        return normed.view(batch, seq, heads, head_dim)


class LPBranchRMSNorm(LPRMSNorm):
    """A sandwich pair's post-norm: each branch of (..., halves, hidden) normed with its own weight row, then the
    branches summed. (The sum inside the norm also tells vLLM's Transformers backend that this is no plain RMSNorm
    of `weight.shape[0]` features to swap for its own.)"""

    def forward(self, branches: torch.Tensor) -> torch.Tensor:
        return super().forward(branches).sum(dim=-2)


def output_norm(config: LPConfig, halves: int) -> LPRMSNorm:
    """A sandwich block's norm of its attention or MLP output: for a pair, each half's output [..., halves, hidden]
    normed by its own weight row, then the halves summed."""
    norm_class = LPBranchRMSNorm if halves > 1 else LPRMSNorm
    shape = (halves, config.hidden_size) if halves > 1 else config.hidden_size
    return norm_class(shape, eps=config.rms_norm_eps, offset=config.norm_offset)


class LPRotaryEmbedding(nn.Module):
    """Rotary tables, shared by every block of an attention type: both halves of a pair use the same positions.
    `rope_parameters`: this type's settings where each type has its own (Gemma 3), else the config's."""

    def __init__(self, config: LPConfig, rope_parameters: dict | None = None):
        super().__init__()
        config = uniform_config(config)
        if rope_parameters is not None:  # a config of this type's settings, for the rope initialisers
            config = copy.copy(config)
            config.rope_parameters = rope_parameters
        self.config = config  # dynamic_rope_update reads self.config again
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: LPConfig, device=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        positions = position_ids[:, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # rotary angles in float32
            freqs = (inv_freq.float() @ positions.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class LPBranchLinear(nn.Linear):
    """A sandwich pair's o_proj or down_proj: any pair's [W_a | W_b] columns, but each half's output kept apart for
    its post-norm.

    It reads `branch_inputs(x)`: (..., halves, halves * in), row h holding half h's inputs in its own columns and
    zeros in the others. As a plain Linear it would then compute W_h x_h for each half, which is what PEFT's LoRA
    (x -> B A x, added to the output) and its merge (W += B A) assume: a LoRA on it trains and merges as on any
    Linear. Its forward skips the zero blocks: one (in -> out) GEMM per half. bias, if any: one row per half.
    """

    def __init__(self, halves: int, in_features: int, out_features: int, bias: bool):
        super().__init__(halves * in_features, out_features, bias=False)
        self.halves = halves
        if bias:
            self.bias = nn.Parameter(torch.zeros(halves, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.in_features // self.halves
        out = torch.stack([
            F.linear(x[..., h, h * width:(h + 1) * width], self.weight[:, h * width:(h + 1) * width])
            for h in range(self.halves)
        ], dim=-2)
        return out + self.bias if self.bias is not None else out


def branch_inputs(x: torch.Tensor, halves: int) -> torch.Tensor:
    """(..., halves * in) -> (..., halves, halves * in): row h keeps half h's columns, zeros elsewhere (LPBranchLinear's
    input)."""
    mask = torch.eye(halves, dtype=x.dtype, device=x.device).repeat_interleave(x.shape[-1] // halves, dim=1)
    return x.unsqueeze(-2) * mask


def output_projection(config: LPConfig, halves: int, in_features: int, bias: bool) -> nn.Linear:
    """o_proj or down_proj of a block ([a | b] columns for a pair): one Linear summing the halves' products, or, where
    each half's output is normed before the sum (sandwich norms), an LPBranchLinear keeping them apart."""
    if config.sandwich_norms and halves > 1:
        return LPBranchLinear(halves, in_features // halves, config.hidden_size, bias)
    return nn.Linear(in_features, config.hidden_size, bias=bias)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim); kv head i serves queries i*n_rep.."""
    batch, kv_heads, seq, dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LPAttention(nn.Module):
    """Attention of one block: `halves` source layers' heads side by side."""

    def __init__(self, config: LPConfig, block_idx: int):
        super().__init__()
        halves = self.halves = len(config.lp_blocks[block_idx])
        self.config = config
        self.layer_idx = block_idx  # the cache and the mask builders index blocks
        self.head_dim = config.head_dim
        num_heads, num_kv_heads, _ = config.block_widths(block_idx)
        self.num_key_value_groups = num_heads // num_kv_heads
        self.qkv_sizes = [num_heads * self.head_dim, num_kv_heads * self.head_dim, num_kv_heads * self.head_dim]
        self.scaling = (config.query_pre_attn_scalar or self.head_dim) ** -0.5  # Gemma: query_pre_attn_scalar
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        is_sliding = config.layer_types[block_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

        self.fused = config.lp_projections == "fused"  # an export written before the separate layout
        if self.fused:
            self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=config.attention_bias)
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.qkv_sizes[0], bias=config.attention_bias)
            self.k_proj = nn.Linear(config.hidden_size, self.qkv_sizes[1], bias=config.attention_bias)
            self.v_proj = nn.Linear(config.hidden_size, self.qkv_sizes[2], bias=config.attention_bias)
        self.o_proj = output_projection(config, halves, self.qkv_sizes[0], config.attention_out_bias)
        if config.qk_norm:
            units = config.lp_head_chunks if halves > 1 else num_kv_heads  # a single layer: any unit will do
            eps, offset = config.rms_norm_eps, config.norm_offset
            self.q_norm = LPHeadRMSNorm(halves, num_heads // halves // units, self.head_dim, eps, offset)
            self.k_norm = LPHeadRMSNorm(halves, num_kv_heads // halves // units, self.head_dim, eps, offset)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # -1: the heads this rank holds
        if self.fused:
            query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
        else:  # Llama's calls, which tensor parallelism shards and vLLM fuses into its own sharded GEMM
            query = self.q_proj(hidden_states)
            key = self.k_proj(hidden_states)
            value = self.v_proj(hidden_states)
        query, key = query.view(hidden_shape), key.view(hidden_shape)
        value = value.view(hidden_shape).transpose(1, 2)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.project_output(attn_output.reshape(*input_shape, -1).contiguous())

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn_output)


class LPBranchAttention(LPAttention):
    """A sandwich pair's attention: its o_proj (an LPBranchLinear) gives each half's output, [..., 2, hidden]. Its own
    class because runtimes that rewrite modules by class, once per class (vLLM's Transformers backend), must not take
    a single layer's plain o_proj pattern for it."""

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.o_proj(branch_inputs(attn_output, self.halves))


class LPMLP(nn.Module):
    """Gated MLP of one block: a pair's gate and up rows are [a, b], its down_proj columns [a | b]."""

    def __init__(self, config: LPConfig, block_idx: int):
        super().__init__()
        _, _, width = config.block_widths(block_idx)
        self.halves = len(config.lp_blocks[block_idx])
        self.fused = config.lp_projections == "fused"  # an export written before the separate layout
        if self.fused:
            self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
            self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = output_projection(config, self.halves, width, config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LPBranchMLP(LPMLP):
    """A sandwich pair's MLP: its down_proj (an LPBranchLinear) gives each half's output; its own class, as
    LPBranchAttention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(branch_inputs(hidden, self.halves))


class LPDecoderBlock(GradientCheckpointingLayer):
    """One source layer, or a layer-parallel pair as one wide pre-norm layer (with sandwich norms: each half's
    attention and MLP outputs normed by its own post-norm, then summed)."""

    def __init__(self, config: LPConfig, block_idx: int):
        super().__init__()
        halves = len(config.lp_blocks[block_idx])
        norm = dict(eps=config.rms_norm_eps, offset=config.norm_offset)
        self.sandwich = config.sandwich_norms
        branches = self.sandwich and halves > 1
        self.self_attn = (LPBranchAttention if branches else LPAttention)(config, block_idx)
        self.mlp = (LPBranchMLP if branches else LPMLP)(config, block_idx)
        self.input_layernorm = LPRMSNorm(config.hidden_size, **norm)
        if self.sandwich:
            self.post_attention_layernorm = output_norm(config, halves)  # the attention output's norm
            self.pre_feedforward_layernorm = LPRMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = output_norm(config, halves)
        else:
            self.post_attention_layernorm = LPRMSNorm(config.hidden_size, **norm)  # the MLP input's norm

    def forward(self, hidden_states, attention_mask, position_embeddings, cache=None, **kwargs):
        attention = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        if not self.sandwich:
            hidden_states = hidden_states + attention
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attention)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp)


class LPPreTrainedModel(PreTrainedModel):
    config_class = LPConfig
    config: LPConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # each block recomputed in the backward pass (GradientCheckpointingLayer)
    _no_split_modules = ["LPDecoderBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # Weight init (for models built without a checkpoint) is transformers' default: it recognises
    # nn.Linear, nn.Embedding, *RMSNorm and *RotaryEmbedding modules by type and class name.

    def _refuse_sharded_branches(self) -> None:
        """A sandwich pair's o_proj and down_proj keep its branches apart (LPBranchLinear), which no tensor-parallel
        plan shards (config.json declares none): refuse a tensor-parallel run (tp_plan="auto", a device mesh) in
        one line, before a kernel fails on shards of the wrong size."""
        distributed = getattr(self.config, "distributed_config", None)
        tp_size = getattr(self, "_tp_size", None) or getattr(distributed, "tp_size", None) or 1
        if tp_size > 1 and self.config.sandwich_norms and any(len(layers) > 1 for layers in self.config.lp_blocks):
            raise ValueError(
                "this model's layer-parallel pairs keep their branches apart until their post-norms (sandwich norms), "
                f"and tensor parallelism ({tp_size} devices) cannot shard those branch projections: load it without "
                "tp_plan (one device, or device_map for several)")


class LPModel(LPPreTrainedModel):
    def __init__(self, config: LPConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_scale = config.embed_scale  # Gemma: sqrt(hidden_size), applied to looked-up embeddings
        self.layers = nn.ModuleList(LPDecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = LPRMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=config.norm_offset)
        per_type = config.rope_parameters if set(config.rope_parameters) <= {"full_attention", "sliding_attention"} \
            else None
        if per_type:  # each attention type its own rotary base (Gemma 3's local and global layers)
            self.rotary_emb = nn.ModuleDict({kind: LPRotaryEmbedding(config, per_type[kind])
                                             for kind in sorted(set(config.layer_types))})
        else:
            self.rotary_emb = LPRotaryEmbedding(config)
        self.post_init()

    def _rotary_tables(self, hidden_states, position_ids) -> dict:
        """(cos, sin) for each attention type present."""
        if isinstance(self.rotary_emb, nn.ModuleDict):
            return {kind: rotary(hidden_states, position_ids) for kind, rotary in self.rotary_emb.items()}
        tables = self.rotary_emb(hidden_states, position_ids)
        return dict.fromkeys(set(self.config.layer_types), tables)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _attention_masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """One mask per attention type present (full, sliding), built by transformers for the backend in use."""
        if isinstance(attention_mask, dict):  # already prepared by the caller (e.g. generate)
            return attention_mask
        mask_kwargs = {
            "config": self.config,
            _MASK_EMBEDS_KW: inputs_embeds,
            "attention_mask": attention_mask,
            _MASK_CACHE_KW: cache,
            "position_ids": position_ids,
        }
        if "cache_position" in _MASK_PARAMS:  # transformers releases before the cache-position removal
            past = cache.get_seq_length() if cache is not None else 0
            mask_kwargs["cache_position"] = torch.arange(
                past, past + inputs_embeds.shape[1], device=inputs_embeds.device
            )
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        self._refuse_sharded_branches()
        cache = _pick_cache(cache, past_key_values)
        kwargs.pop("cache_position", None)  # positions come from the cache length
        if use_cache is None:  # no cache to fill while the blocks are recomputed for the backward pass
            recomputed = self.training and any(block.gradient_checkpointing for block in self.layers)
            use_cache = self.config.use_cache and not recomputed
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.embed_scale is not None:  # as Gemma: the scale rounded to the weights' dtype first
                inputs_embeds = inputs_embeds * torch.tensor(self.embed_scale, dtype=inputs_embeds.dtype)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self._rotary_tables(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        for i, block in enumerate(self.layers[: self.config.num_hidden_layers]):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(  # by index: a pipeline-parallel rank holds placeholders for others' blocks
                hidden_states,
                attention_mask=masks[self.config.layer_types[i]],
                position_embeddings=position_embeddings[self.config.layer_types[i]],
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_OUTPUT_CACHE_FIELD: cache if use_cache else None},
        )


class LPForCausalLM(LPPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LPConfig):
        super().__init__(config)
        self.model = LPModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        self._refuse_sharded_branches()  # tensor parallelism is set on the model loaded (this one), not self.model
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()


__all__ = ["LPForCausalLM", "LPModel", "LPPreTrainedModel"]
