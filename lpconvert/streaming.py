"""Run a model whose weights stay on disk: each decoder layer is read when it runs and freed after.

`streamed_model(source, dtype, device)` returns the source's own transformers model (or, for an lpconvert
export, lpconvert's LPForCausalLM) built on the meta device, with the decoder layers, the embedding and the
output head replaced by `StreamedModule`s. A StreamedModule holds no weights: when it is called it reads its
tensors from the source's TensorStore (one layer's tensors, from whichever shard holds them), casts them to the
compute dtype, runs, and leaves them in a small cache of the last few modules used (`keep`). Everything else
(the final norm, rotary tables) is small and loaded once.

Memory is then one or two layers in the compute dtype plus what the caller keeps, whatever the depth. Whether
that is also fast depends on the order of the work: a caller that runs every window through layer i before
layer i+1 (layer-major: score, heal, eval in this package) reads each layer once per pass; a full forward per
batch (model(ids), generate) reads every layer once per call. The weights are the same tensors in the same
dtype as `from_pretrained(dtype=...)` gives, and each module runs the same code, so results are equal to the
in-memory model's bit for bit where the order of operations is the same.

How the field does the same (GPTQModel's LazyTurtle, AutoRound's disk-stream mode): ../shared/docs/SCALE-NOTES.md.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import LPError
from .quiet import first_line, quiet_transformers

LOADS = ("stream", "whole")  # --load: weights read a layer at a time (default), or the whole model in memory
KEEP = 2  # modules kept after use: a pair's two layers, or one layer and the head


class WeightCache:
    """The modules of one streamed model that hold weights right now, least recently used first."""

    def __init__(self, store, dtype: torch.dtype, device: torch.device, keep: int = KEEP):
        self.store, self.dtype, self.device, self.keep = store, dtype, device, keep
        self.loaded: OrderedDict[str, nn.Module] = OrderedDict()
        self.reads = 0  # modules read from the store: a measure of a caller's order of work
        self.read_bytes = 0

    def get(self, streamed: StreamedModule) -> nn.Module:
        module = self.loaded.pop(streamed.prefix, None)
        if module is None:
            while len(self.loaded) >= self.keep:  # make room first: the old and the new module are never both held
                self.loaded.popitem(last=False)
            module = self._read(streamed)
        self.loaded[streamed.prefix] = module
        return module

    def clear(self) -> None:
        self.loaded.clear()

    def _read(self, streamed: StreamedModule) -> nn.Module:
        module = copy.deepcopy(streamed.template)
        state = {}
        for name, meta in streamed.template.state_dict(keep_vars=True).items():
            stored = self.store.read(streamed.stored_name(name))
            dtype = self.dtype if meta.is_floating_point() else meta.dtype
            state[name] = stored.to(device=self.device, dtype=dtype)
            self.read_bytes += stored.numel() * stored.element_size()
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)  # streamed weights are read, never trained (heal trains copies of its own)
        self.reads += 1
        return module.eval()


class StreamedModule(nn.Module):
    """Stands in for a submodule whose weights stay in the store (see the module docstring).

    Its template (the meta-device module) is kept outside the module tree, so the model's parameters() and
    to() see only real tensors; attributes that are not weights (a layer's attention_type, say) read through."""

    def __init__(self, template: nn.Module, prefix: str, cache: WeightCache, aliases: dict[str, str] | None = None):
        super().__init__()
        self.__dict__["template"] = template
        self.__dict__["cache"] = cache
        self.prefix = prefix
        self.aliases = aliases or {}  # tied weights: the head's weight is the embedding's

    def stored_name(self, name: str) -> str:
        full = self.prefix + name
        return self.aliases.get(full, full)

    def module(self) -> nn.Module:
        """The real module, its weights read now if they are not cached."""
        return self.cache.get(self)

    def forward(self, *args, **kwargs):
        return self.module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["template"], name)


def streamed_parts(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the parts a streamed model reads on demand: each decoder layer, the embedding and
    the output head. The rest (norms, rotary tables) is loaded once."""
    inner = model.model
    parts = [(inner.layers, str(i)) for i in range(len(inner.layers))]
    return [(inner, "embed_tokens"), *parts, (model, "lm_head")]


def _meta_model(source, dtype: torch.dtype) -> nn.Module:
    """The source's model class with its weights on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights

    with quiet_transformers(), init_empty_weights(include_buffers=False):
        if source.kind == "lpconvert":
            from .modeling.modeling_lpconvert import LPForCausalLM

            return LPForCausalLM(source.config).to(dtype)
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_config(_transformers_config(source), dtype=dtype,
                                                    trust_remote_code=source.trust_remote_code)
        except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
            raise LPError(f"transformers cannot build the model of {source.name}: {first_line(exc)}",
                          "check its config.json, or pass --load whole") from None


def _transformers_config(source):
    from transformers import PretrainedConfig

    if isinstance(source.config, PretrainedConfig):
        return source.config
    from .folders import load_hf_config, read_config_json

    return load_hf_config(source.path, read_config_json(source.path), source.trust_remote_code)


def _expected(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def _check_weights(source, expected: dict[str, tuple[int, ...]], aliases: dict[str, str]) -> None:
    """Every tensor the model reads is in the store with its shape: refused before any work, not at layer 40."""
    infos = source.store.infos()
    for name, shape in expected.items():
        stored = aliases.get(name, name)
        info = infos.get(stored)
        if info is None:
            raise LPError(f"{source.name} has no tensor {stored}, which its config.json implies",
                          "re-download the checkpoint, or check that config.json belongs to these weights")
        if tuple(info.shape) != shape:
            raise LPError(f"{source.name}'s tensor {stored} has shape {list(info.shape)}, but its config.json "
                          f"implies {list(shape)}", "check that config.json belongs to these weights")


def _tied_aliases(config) -> dict[str, str]:
    tied = getattr(config, "tie_word_embeddings", False)
    return {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}


def streamed_model(source, dtype: torch.dtype, device: str | torch.device = "cpu", keep: int = KEEP) -> nn.Module:
    """The model of `source` in eval mode, reading its layers, embedding and head from disk when they run."""
    model = _meta_model(source, dtype)
    aliases = _tied_aliases(source.config)
    expected = _expected(model)
    _check_weights(source, expected, aliases)
    cache = WeightCache(source.store, dtype, torch.device(device), keep)
    streamed = set()
    for parent, attribute in streamed_parts(model):
        prefix = _prefix_of(model, getattr(parent, attribute))
        setattr(parent, attribute, StreamedModule(getattr(parent, attribute), prefix, cache, aliases))
        streamed.add(prefix)
    _load_the_rest(model, source.store, expected, streamed, dtype, device)
    model.weight_cache = cache
    # Tied weights are tied in the store (the head reads the embedding's tensor): nothing left for transformers to tie
    # (lm-evaluation-harness calls tie_weights on the model it is given).
    model.tie_weights = lambda *args, **kwargs: None
    return model.eval()


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}."
    raise AssertionError("a streamed part is not in its model")


def _load_the_rest(model, store, expected, streamed: set[str], dtype, device) -> None:
    """Small tensors outside the streamed parts (the final norm) are read once."""
    rest = {name: store.read(name) for name in expected if not any(name.startswith(p) for p in streamed)}
    for name, tensor in rest.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        meta = getattr(module, leaf)
        value = tensor.to(device=device, dtype=dtype if meta.is_floating_point() else meta.dtype)
        if isinstance(meta, nn.Parameter):
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    model.to(device)


def real_module(module: nn.Module) -> nn.Module:
    """The module itself, or a StreamedModule's weights read now."""
    return module.module() if isinstance(module, StreamedModule) else module


def is_streamed(model: nn.Module) -> bool:
    return hasattr(model, "weight_cache")


def load_model(source, *, dtype: torch.dtype, device: str, load: str = "stream", device_map: str | None = None,
               keep: int = KEEP):
    """The model a stage runs: streamed (the default; `keep` modules cached), or whole in memory (`load` "whole", or a
    device_map to spread it over several devices with accelerate)."""
    if load == "whole" or device_map or source.kind == "llama.cpp":  # llama.cpp runs a GGUF in its own process
        return source.load_model(dtype=dtype, device=device, device_map=device_map)
    return streamed_model(source, dtype, device, keep)


# ----------------------------------------------------------------------------------------------
# Layer-major runs of a model's own forward


class _Recorder(nn.Module):
    """Stands in for decoder layer i during a capture: passes the stream through and keeps what the model's forward
    gives the layer (masks, rotary tables, positions) for each batch, and (`inputs`) the stream itself."""

    def __init__(self, calls: list, inputs: list | None = None):
        super().__init__()
        self.calls, self.inputs = calls, inputs

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.inputs is not None:
            self.inputs.append(hidden_states)
        return hidden_states


class LayerMajor:
    """Many batches through a causal LM's decoder layers one layer at a time, each layer called exactly as the
    model's own forward calls it: the same modules with the same masks and rotary tables, so the logits are the
    ones model(ids) gives, bit for bit, while a streamed model reads each layer once.

    The per-layer arguments are captured once per batch by running the model's forward with every layer replaced
    by a recorder that passes the stream through (GPTQModel's StageInputsCapture does the same for layer 0); the
    first recorder's input is the embedded batch."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        self.model, self.inner = model, model.model
        self.num_layers = len(self.inner.layers)
        self.calls: list[list[tuple]] = [[] for _ in range(self.num_layers)]
        self.inputs: list[torch.Tensor] = []  # the embedded batches
        layers = self.inner.layers
        self.inner.layers = nn.ModuleList(_Recorder(calls, self.inputs if i == 0 else None)
                                          for i, calls in enumerate(self.calls))
        try:
            with torch.inference_mode():
                for ids in batches:
                    self.inner(input_ids=ids.to(model.device), use_cache=False)
        finally:
            self.inner.layers = layers

    def run(self, xs: list[torch.Tensor], start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """Move the streams `xs` (one per batch, at the input of layer `start`) on past layers start..stop-1, in place
        (the list holds the newest streams only: one stream of every batch is kept, not two)."""
        for i in range(start, self.num_layers if stop is None else stop):
            layer = real_module(self.inner.layers[i])
            for b, (args, kwargs) in enumerate(self.calls[i]):
                xs[b] = _stream(layer(xs[b], *args, **kwargs))
            del layer  # not held while the next layer is read
        return xs

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """What the model's head makes of a final stream (its final norm, then lm_head)."""
        return real_module(self.model.lm_head)(self.inner.norm(x))


def _stream(output):
    return output[0] if isinstance(output, tuple) else output
