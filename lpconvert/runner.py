"""Run a source model layer by layer, with any pairs evaluated in parallel.

Scoring and planning need the model with some pairs run side by side *without* exporting it, and
they need the residual stream between layers (to restart from layer i instead of layer 0). This
runner evaluates the ORIGINAL transformers layers, one at a time, a pair by the two-branch formula

    h = x + Attn_a(N1_a(x)) + Attn_b(N1_b(x))
    y = h + Mlp_a(N2_a(h))  + Mlp_b(N2_b(h))

on fixed-length windows without padding (calibration text), so positions and causal masks are
computed once. Where the layers norm their own outputs (Gemma 3's sandwich norms, archs.LayerNorms), Attn and
Mlp above include those post-norms: each branch is normed before the sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from .archs import architecture_for, rope_by_layer_type
from .streaming import real_module

# A pair's fused input projections (the export's names) -> the module holding them and their parts in row order.
# The norm folded into them is the layer's input norm of that sub-block (archs.LayerNorms).
INPUT_PROJECTIONS = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}
OUTPUT_OF = {"qkv_proj": "o_proj", "gate_up_proj": "down_proj"}


def _call(module: torch.nn.Module, weights: dict[str, torch.Tensor] | None, *args, **kwargs):
    """module(*args, **kwargs), with `weights` in place of its own parameters of those names."""
    if weights is None:
        return module(*args, **kwargs)
    return torch.func.functional_call(module, weights, args, kwargs)


def _norm(norm: torch.nn.Module, x: torch.Tensor, folded: dict | None, offset: float) -> torch.Tensor:
    # A healed input projection has the norm's weight folded in (as the export's does): the norm is unit
    # (weight 1, or 0 where the norm scales by 1 + weight).
    if folded is None:
        return norm(x)
    return _call(norm, {"weight": torch.full_like(norm.weight, 1.0 - offset)}, x)


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
        # Healed projections of pairs (heal stage): pair start -> {name: weight}, each as the export
        # writes the pair's fused tensor: "o_proj"/"down_proj" [a | b] columns (hidden x 2 * inputs),
        # "qkv_proj"/"gate_up_proj" rows with each layer's norm folded in (INPUT_PROJECTIONS).
        self.corrections: dict[int, dict[str, torch.Tensor]] = {}
        self.inner = model.model
        self.config = model.config
        arch = architecture_for(self.config)
        self.norms, self.norm_offset = arch.norms, arch.norm_offset
        self.num_layers = self.config.num_hidden_layers
        self.seq_len = seq_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        positions = torch.arange(seq_len, device=self.device)[None]
        dummy = torch.zeros(1, seq_len, 1, device=self.device, dtype=self.dtype)
        self.position_ids = positions
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if not types:
            types = ["sliding_attention" if window else "full_attention"] * self.num_layers
        masks = {"full_attention": _causal_mask(seq_len, None, self.dtype, self.device)}
        if "sliding_attention" in types:
            masks["sliding_attention"] = _causal_mask(seq_len, window, self.dtype, self.device)
        self.masks = [masks[t] for t in types]
        if rope_by_layer_type(self.config):  # each attention type its own rotary base (Gemma 3)
            tables = {t: self.inner.rotary_emb(dummy, positions, t) for t in set(types)}
        else:
            tables = dict.fromkeys(set(types), self.inner.rotary_emb(dummy, positions))
        self.rotary = [tables[t] for t in types]

    # --- one layer, one pair -------------------------------------------------------------------

    def _layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i (a streamed model reads its weights now, unless they are among the last used)."""
        return real_module(self.inner.layers[i])

    def _on_layer_device(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # With a device_map the layers of a pair may sit on different devices.
        return x.to(self._layer(i).input_layernorm.weight.device)

    def _post_norm(self, i: int, name: str, out: torch.Tensor) -> torch.Tensor:
        """A sandwich layer's norm of its attention ("o_proj") or MLP ("down_proj") output; else the output."""
        norm = self.norms.attention_output if name == "o_proj" else self.norms.mlp_output
        return getattr(self._layer(i), norm)(out) if norm else out

    def attention(self, i: int, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
                  post_norm: bool = True) -> torch.Tensor:
        """Attn_i(N1_i(x)); `weights`: a healed pair's q/k/v for this layer, its norm folded in (norm then unit)."""
        layer = self._layer(i)
        local = self._on_layer_device(i, x)
        cos, sin = (t.to(local.device) for t in self.rotary[i])
        norm = getattr(layer, self.norms.attention_input)
        out = _call(layer.self_attn, weights, hidden_states=_norm(norm, local, weights, self.norm_offset),
                    position_embeddings=(cos, sin), attention_mask=self.masks[i].to(local.device),
                    position_ids=self.position_ids)[0]
        return (self._post_norm(i, "o_proj", out) if post_norm else out).to(x.device)

    def mlp(self, i: int, h: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
            post_norm: bool = True) -> torch.Tensor:
        layer = self._layer(i)
        local = self._on_layer_device(i, h)
        out = _call(layer.mlp, weights, _norm(getattr(layer, self.norms.mlp_input), local, weights, self.norm_offset))
        return (self._post_norm(i, "down_proj", out) if post_norm else out).to(h.device)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(i, x)
        return h + self.mlp(i, h)

    def pair(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i in self.corrections:
            return self.corrected_pair(i, x)
        h = x + self.attention(i, x) + self.attention(i + 1, x)
        return h + self.mlp(i, h) + self.mlp(i + 1, h)

    # --- a pair with healed projections ----------------------------------------------------------

    @contextlib.contextmanager
    def _projection_inputs(self, i: int, name: str) -> Iterator[None]:
        """Layer i's attention or MLP returns the input of its output projection (o_proj, down_proj)."""
        module = self._layer(i).self_attn if name == "o_proj" else self._layer(i).mlp
        projection = getattr(module, name)
        setattr(module, name, torch.nn.Identity())
        try:
            yield
        finally:
            setattr(module, name, projection)

    def _layer_inputs(self, i: int, name: str) -> tuple[dict | None, dict | None]:
        """Layers i and i+1's halves of a healed fused input projection (qkv_proj, gate_up_proj), as
        {"q_proj.weight": ..} for each, or (None, None) where the pair keeps its own."""
        fused = self.corrections.get(i, {}).get(name)
        if fused is None:
            return None, None
        module_name, parts = INPUT_PROJECTIONS[name]
        halves: tuple[dict, dict] = ({}, {})
        row = 0
        for part in parts:  # rows [p1_a, p1_b, p2_a, p2_b, ...] as archs' "rows" rule writes them
            for layer, half in zip((i, i + 1), halves, strict=True):
                weight = getattr(getattr(self._layer(layer), module_name), part).weight
                half[f"{part}.weight"] = fused[row:row + weight.shape[0]].to(weight)
                row += weight.shape[0]
        return halves

    def pair_inputs(self, i: int, x: torch.Tensor, name: str) -> torch.Tensor:
        """[a | b]: what the pair's fused o_proj (name "o_proj", from the stream x) or down_proj
        ("down_proj", from h) reads, as the export concatenates them."""
        part = self.attention if name == "o_proj" else self.mlp
        inputs = self._layer_inputs(i, "qkv_proj" if name == "o_proj" else "gate_up_proj")
        with self._projection_inputs(i, name), self._projection_inputs(i + 1, name):
            return torch.cat([part(i, x, inputs[0], post_norm=False), part(i + 1, x, inputs[1], post_norm=False)],
                             dim=-1)

    def projection(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pair's fused projection as the export builds it: an output projection's weight [a | b]
        and summed bias; an input projection's rows with each layer's norm folded in (float32), no bias."""
        layers = [self._layer(i), self._layer(i + 1)]
        if name in INPUT_PROJECTIONS:
            blocks, norms = self.input_parts(i, name)
            return torch.cat([w.float() * norms[half].float()[None, :] for w, half in blocks]).detach(), None
        modules = [(layer.self_attn if name == "o_proj" else layer.mlp) for layer in layers]
        weights = [getattr(m, name).weight for m in modules]
        biases = [getattr(m, name).bias for m in modules]
        bias = None if biases[0] is None else (biases[0].float() + biases[1].float()).to(biases[0].dtype).detach()
        return torch.cat(weights, dim=1).detach(), bias

    def input_parts(self, i: int, name: str) -> tuple[list[tuple[torch.Tensor, int]], dict[int, torch.Tensor]]:
        """What a pair's fused input projection is made of: the layers' weights in the export's row order,
        each with its half (0: layer i, 1: layer i+1), and each half's norm weight (folded into its rows)."""
        module_name, parts = INPUT_PROJECTIONS[name]
        norm = self.norms.attention_input if name == "qkv_proj" else self.norms.mlp_input
        layers = [self._layer(i), self._layer(i + 1)]
        blocks = [(getattr(getattr(layer, module_name), part).weight, half)
                  for part in parts for half, layer in enumerate(layers)]
        return blocks, {half: self.norm_offset + getattr(layer, norm).weight for half, layer in enumerate(layers)}

    def _projected(self, i: int, name: str, inputs: torch.Tensor) -> torch.Tensor:
        weight, bias = self.projection(i, name)
        weight = self.corrections[i].get(name, weight).to(inputs)
        if self.norms.sandwich:  # each branch through its own post-norm, then summed
            halves = zip(weight.chunk(2, dim=1), inputs.chunk(2, dim=-1), (i, i + 1), strict=True)
            return sum(self._post_norm(layer, name, F.linear(z, w, self._own_bias(layer, name)))
                       for w, z, layer in halves)
        return F.linear(inputs, weight, None if bias is None else bias.to(inputs))

    def _own_bias(self, i: int, name: str) -> torch.Tensor | None:
        module = self._layer(i).self_attn if name == "o_proj" else self._layer(i).mlp
        return getattr(module, name).bias

    def output_gains(self, i: int, name: str) -> torch.Tensor:
        """A sandwich pair's post-norm scales after its o_proj ("o_proj") or down_proj: [2, hidden], float32."""
        norm = self.norms.attention_output if name == "o_proj" else self.norms.mlp_output
        return torch.stack([self.norm_offset + getattr(self._layer(layer), norm).weight.float()
                            for layer in (i, i + 1)])

    def pair_attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Attn_a(N1_a(x)) + Attn_b(N1_b(x)), through the pair's healed projections where it has them."""
        if "o_proj" in self.corrections.get(i, {}):
            return self._projected(i, "o_proj", self.pair_inputs(i, x, "o_proj"))
        a, b = self._layer_inputs(i, "qkv_proj")
        return self.attention(i, x, a) + self.attention(i + 1, x, b)

    def pair_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if "down_proj" in self.corrections.get(i, {}):
            return self._projected(i, "down_proj", self.pair_inputs(i, h, "down_proj"))
        a, b = self._layer_inputs(i, "gate_up_proj")
        return self.mlp(i, h, a) + self.mlp(i + 1, h, b)

    def corrected_pair(self, i: int, x: torch.Tensor) -> torch.Tensor:
        h = x + self.pair_attention(i, x)
        return h + self.pair_mlp(i, h)

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

    def run_all(self, xs: list[torch.Tensor], start: int = 0, pairs: Iterable[int] = (), stop: int | None = None
                ) -> list[torch.Tensor]:
        """`run` for every batch of `xs`, layer-major: every batch through one layer (or pair) before the next, so a
        streamed model reads each layer once. Same operations per batch as `run`: the same results."""
        starts = set(pairs)
        stop = self.num_layers if stop is None else stop
        i = start
        while i < stop:
            step = self.pair if i in starts else self.layer
            xs = [step(i, x) for x in xs]
            i += 2 if i in starts else 1
        return xs

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
        head = real_module(self.model.lm_head)
        return head(self.inner.norm(x).to(head.weight.device)).float()


def topk_reference(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """A next-token distribution kept as its top k log-probabilities and one bucket for the rest:
    (indices, log p, p, log p_rest, p_rest). What a KL against it needs, at k/vocab of the memory."""
    top, idx = logp.topk(k, dim=-1)
    rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top, dim=-1)), min=1e-12))
    return idx, top, top.exp(), rest, rest.exp()


def kl_to_reference(reference: tuple[torch.Tensor, ...], logp: torch.Tensor) -> torch.Tensor:
    """KL(reference || logp) per position, over the reference's top k and one bucket for the rest."""
    idx, ref_top, ref_p, ref_rest, ref_rest_p = reference
    top = logp.gather(-1, idx)
    rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top, dim=-1)), min=1e-12))
    return (ref_p * (ref_top - top)).sum(-1) + ref_rest_p * (ref_rest - rest)


def batches(input_ids: torch.Tensor, batch_size: int):
    for start in range(0, input_ids.shape[0], batch_size):
        yield input_ids[start:start + batch_size]


# --- where a stream stops being a number ---------------------------------------------------------


class NotFinite(Exception):
    """A measurement is NaN or Inf; `where` names the first place the stream stops being finite."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _bad_tensor(module: torch.nn.Module, prefix: str) -> str | None:
    for name, param in module.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"{prefix}.{name}"
    return None


def locate_nonfinite(runner: LayerRunner, input_ids: torch.Tensor) -> str:
    """Where the stream of these windows first holds NaN or Inf: the embeddings, a layer (with its first tensor
    that is not finite, if one is) or the head; 'the measurements' where the stream stays finite throughout."""
    with torch.inference_mode():
        x = runner.embed(input_ids)
        if not bool(torch.isfinite(x).all()):
            bad = _bad_tensor(real_module(runner.inner.embed_tokens), "model.embed_tokens")
            return "the embeddings" + (f" ({bad} holds NaN or Inf)" if bad else "")
        for i in range(runner.num_layers):
            x = runner.layer(i, x)
            if not bool(torch.isfinite(x).all()):
                bad = _bad_tensor(runner._layer(i), f"model.layers.{i}")
                return f"layer {i}" + (f" ({bad} holds NaN or Inf)" if bad else "'s output")
        if not bool(torch.isfinite(runner.logprobs(x)).all()):
            return "the output head (final norm and lm_head)"
    return "the measurements"


def not_finite_fix(dtype: str, setter) -> str:
    """What to do about a stream that is not finite: float16's range overflows; otherwise the weights are broken."""
    if dtype == "float16":
        return f"{setter('dtype', 'bfloat16')}, whose range does not overflow as float16's does; or check the weights"
    return "re-download or re-convert the checkpoint: its weights hold NaN or Inf, a corrupted or overflowed file"
