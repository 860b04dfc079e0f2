"""Run a source model layer by layer, with any pairs evaluated in parallel.

Scoring and planning need the model with some pairs run side by side *without* exporting it, and
they need the residual stream between layers (to restart from layer i instead of layer 0). This
runner evaluates the ORIGINAL transformers layers, one at a time, a pair by the two-branch formula

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

on fixed-length windows without padding (calibration text), so positions and causal masks are
computed once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def _causal_mask(seq: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    mask = torch.zeros(seq, seq, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class LayerRunner:
    """Evaluate a Llama-family transformers model's layers on windows of `seq_len` tokens."""

    def __init__(self, model, seq_len: int):
        self.model = model
        self.inner = model.model
        self.config = model.config
        self.num_layers = self.config.num_hidden_layers
        self.seq_len = seq_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        positions = torch.arange(seq_len, device=self.device)[None]
        dummy = torch.zeros(1, seq_len, 1, device=self.device, dtype=self.dtype)
        self.position_embeddings = self.inner.rotary_emb(dummy, positions)
        self.position_ids = positions
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if not types:
            types = ["sliding_attention" if window else "full_attention"] * self.num_layers
        masks = {"full_attention": _causal_mask(seq_len, None, self.dtype, self.device)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = _causal_mask(seq_len, window, self.dtype, self.device)
        self.masks = [masks[t] for t in types]

    # --- one layer, one pair -------------------------------------------------------------------

    def _on_layer_device(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # With a device_map the layers of a pair may sit on different devices.
        return x.to(self.inner.layers[i].input_layernorm.weight.device)

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.inner.layers[i]
        local = self._on_layer_device(i, x)
        cos, sin = (t.to(local.device) for t in self.position_embeddings)
        out = layer.self_attn(hidden_states=layer.input_layernorm(local), position_embeddings=(cos, sin),
                              attention_mask=self.masks[i].to(local.device), position_ids=self.position_ids)
        return out[0].to(x.device)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.inner.layers[i]
        local = self._on_layer_device(i, h)
        return layer.mlp(layer.post_attention_layernorm(local)).to(h.device)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(i, x)
        return h + self.mlp(i, h)

    def pair(self, i: int, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(i, x) + self.attention(i + 1, x)
        return h + self.mlp(i, h) + self.mlp(i + 1, h)

    # --- whole stacks ----------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids.to(self.device))

    def run(self, x: torch.Tensor, start: int = 0, pairs: Iterable[int] = (), stop: int | None = None
            ) -> torch.Tensor:
        """Residual stream after layers start..stop-1, with the given pair starts run in parallel."""
        starts = set(pairs)
        stop = self.num_layers if stop is None else stop
        i = start
        while i < stop:
            if i in starts:
                x = self.pair(i, x)
                i += 2
            else:
                x = self.layer(i, x)
                i += 1
        return x

    def nll(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (float64) and token count, from the final stream."""
        logits = self._head(x)
        targets = input_ids.to(self.device)[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return float(loss.double()), targets.numel()

    def logprobs(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (float32) from the final stream."""
        return F.log_softmax(self._head(x), dim=-1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.inner.norm.weight.device)
        return self.model.lm_head(self.inner.norm(x).to(self.model.lm_head.weight.device)).float()


def batches(input_ids: torch.Tensor, batch_size: int):
    for start in range(0, input_ids.shape[0], batch_size):
        yield input_ids[start:start + batch_size]
