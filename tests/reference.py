"""An independent reference for layer-parallel models, built from the ORIGINAL transformers layers.

It shares no code with the export: no folding, no concatenation. Each pair is evaluated literally
by the two-branch formula of docs/method.md section 1 (how the tests use it: section 5):

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

and for Gemma 3, whose layers norm their outputs too (P, Q: post-attention and post-feed-forward norms),

    h = x + P_a(Attn_a(N1_a(x))) + P_b(Attn_b(N1_b(x)))
    y = h + Q_a(Mlp_a(N2_a(h)))  + Q_b(Mlp_b(N2_b(h)))
"""

from __future__ import annotations

import torch


def _mask(seq: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    mask = torch.zeros(seq, seq, dtype=dtype, device=device)
    mask[~allowed] = torch.finfo(dtype).min
    return mask[None, None]


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, pairs: list[int]) -> torch.Tensor:
    """Logits of `model` (a transformers Llama-family model, eager attention) with `pairs` run in parallel."""
    model.config._attn_implementation = "eager"
    inner = model.model
    config = model.config
    seq = input_ids.shape[1]
    position_ids = torch.arange(seq, device=input_ids.device)[None]
    x = inner.embed_tokens(input_ids)  # Gemma's embedding module applies its sqrt(hidden) scale itself
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    sandwich = hasattr(inner.layers[0], "pre_feedforward_layernorm")

    def attn(layer, index, hidden):
        sliding = types[index] == "sliding_attention" or (getattr(config, "layer_types", None) is None and window)
        mask = _mask(seq, window if sliding else None, hidden.dtype, hidden.device)
        rotary = inner.rotary_emb(x, position_ids, types[index]) if sandwich else inner.rotary_emb(x, position_ids)
        out = layer.self_attn(hidden_states=hidden, position_embeddings=rotary,
                              attention_mask=mask, position_ids=position_ids)[0]
        return layer.post_attention_layernorm(out) if sandwich else out

    def mlp(layer, hidden):
        if sandwich:
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        return layer.mlp(layer.post_attention_layernorm(hidden))

    starts = set(pairs)
    i = 0
    while i < config.num_hidden_layers:
        a = inner.layers[i]
        if i in starts:
            b = inner.layers[i + 1]
            h = x + attn(a, i, a.input_layernorm(x)) + attn(b, i + 1, b.input_layernorm(x))
            x = h + mlp(a, h) + mlp(b, h)
            i += 2
        else:
            h = x + attn(a, i, a.input_layernorm(x))
            x = h + mlp(a, h)
            i += 1
    logits = model.lm_head(inner.norm(x))
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
