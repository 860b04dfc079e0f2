"""Will the model fit? Checked before a stage loads a model whole (score, plan with a model, heal, eval, tasks).

A model too large for the machine does not fail with a message: the kernel's OOM killer ends the process
(exit 137, nothing said) after minutes of loading. So each stage estimates its peak first and refuses in
one line when it exceeds what the device has:

    peak = copies x parameters x bytes of the compute dtype       (the weights; eval holds two models)
         + working memory                                          (logits, kept streams: the stage's own)
         + MARGIN_FRACTION of the weights + MARGIN_BYTES           (the runtime, buffers, allocator slack)

The parameters are counted from config.json (the architecture table's shapes), before any weight is read;
where the config is not a source architecture's (an lpconvert export), from the checkpoint's tensor headers.
What the machine has: for a CUDA device, the GPU's free memory; else the cgroup's limit less what the
cgroup uses (v2 memory.max, v1 memory.limit_in_bytes), and never more than /proc/meminfo's MemAvailable.

LPCONVERT_SKIP_MEMORY_CHECK=1 skips the check (for an expert who knows the estimate is wrong for them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import LPError

SKIP_ENV = "LPCONVERT_SKIP_MEMORY_CHECK"
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 2**30
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weights: int  # bytes of every copy's weights
    working: int  # the stage's own working memory (logits, kept streams)
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.working + self.margin


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# Parameters


def config_parts(config) -> dict[str, int] | None:
    """Parameters a source config promises (Llama family and Gemma 3 tables): one decoder layer's, the embedding's,
    the head's (0 where tied) and the number of layers; None for another config."""
    from .archs import ARCHITECTURES, config_size

    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        return None
    try:
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        vocab, inner = int(config.vocab_size), int(config.intermediate_size)
        q = config_size(config, "num_attention_heads * head_dim")
        kv = config_size(config, "num_key_value_heads * head_dim")
        head_dim = config_size(config, "head_dim")
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    flags = arch.flags(config)
    per_layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inner  # q and o, k and v, gate/up/down
    per_layer += (4 if arch.norms.sandwich else 2) * hidden + (2 * head_dim if flags["qk_norm"] else 0)
    per_layer += (q + 2 * kv if flags["attention_bias"] else 0) + (hidden if flags["attention_out_bias"] else 0)
    per_layer += (2 * inner + hidden if flags["mlp_bias"] else 0)
    head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    return {"layer": per_layer, "embedding": vocab * hidden, "head": head, "layers": layers, "norm": hidden}


def config_parameters(config) -> int | None:
    """Parameters a source config promises, or None for a config that is not a table architecture's."""
    parts = config_parts(config)
    if parts is None:
        return None
    return parts["embedding"] + parts["layers"] * parts["layer"] + parts["norm"] + parts["head"]


def stored_parameters(source) -> int | None:
    """Parameters the checkpoint's tensor headers hold (nothing read but the headers)."""
    try:
        infos = source.store.infos()
    except Exception:  # a store that cannot list its tensors: no estimate, no check
        return None
    total = 0
    for info in infos.values():
        count = 1
        for size in info.shape:
            count *= int(size)
        total += count
    return total


def parameters_of(source) -> int | None:
    return config_parameters(source.config) or stored_parameters(source)


# ----------------------------------------------------------------------------------------------
# What the machine has


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_paths(controller: str) -> list[str]:
    """This process's cgroup path for `controller` ('' for v2), from /proc/self/cgroup."""
    found = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller in controllers.split(",")) if controller else controllers == "":
                found.append(path)
    except (OSError, ValueError):
        pass
    return found


def _with_ancestors(root: Path, path: str) -> list[Path]:
    """root/a/b/c, root/a/b, root/a and root: a parent's limit bounds its children too."""
    parts = [part for part in path.split("/") if part]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(bytes the cgroup may still use, its limit), or None without a limit: the tightest of this process's cgroup
    and its ancestors, v2 (memory.max) and v1 (memory.limit_in_bytes). A limit less what its cgroup holds, the
    inactive file cache counted as free (the kernel reclaims it first)."""
    kinds = [("", root, "memory.max", "memory.current", "inactive_file"),
             ("memory", root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
    found = []
    for controller, base, limit_file, usage_file, inactive in kinds:
        folders = [folder for path in _cgroup_paths(controller) for folder in _with_ancestors(base, path)] or [base]
        for folder in dict.fromkeys(folders):
            limit = _read_int(folder / limit_file)
            if limit is None or limit >= _NO_LIMIT:
                continue
            used = _read_int(folder / usage_file) or 0
            used -= min(used, _stat_value(folder / "memory.stat", inactive))
            found.append((max(0, limit - used), limit))
    return min(found) if found else None


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_available() -> tuple[int, str] | None:
    cgroup = cgroup_available()
    system = meminfo_available()
    if cgroup is not None and (system is None or cgroup[0] <= system):
        return cgroup[0], f"available under this cgroup's {gib(cgroup[1])} limit"
    if system is not None:
        return system, "available (MemAvailable)"
    return None


def available_memory(device: str, spread: bool = False) -> tuple[int, str] | None:
    """(bytes free for a model on `device`, where that figure comes from), or None where it is not known.
    `spread` (a device_map): every GPU's free memory and the CPU's together."""
    if spread:
        import torch

        cpu = _cpu_available()
        gpus = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        if cpu is None:
            return None
        return cpu[0] + sum(gpus), f"free on {len(gpus)} GPUs and the CPU together" if gpus else cpu[1]
    if device.startswith("cuda"):
        import torch

        try:
            index = torch.device(device).index
            free, _ = torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return free, f"free on {device}"
    if device != "cpu":
        return None  # mps: unified memory, no figure worth refusing on
    return _cpu_available()


# ----------------------------------------------------------------------------------------------
# The check


def estimate(parameters: int, dtype: str, copies: int = 1, working: int = 0) -> Estimate:
    weights = copies * parameters * DTYPE_BYTES[dtype]
    return Estimate(parameters, weights, working, int(MARGIN_FRACTION * weights) + MARGIN_BYTES)


def stream_bytes(config, tokens: int, dtype: str, streams: int = 1) -> int:
    """The residual stream of `tokens` tokens, `streams` times (what a layer-major stage keeps between layers)."""
    return streams * tokens * int(getattr(config, "hidden_size", 0) or 0) * DTYPE_BYTES[dtype]


def logits_bytes(config, batch_size: int, seq_len: int, copies: int = 1) -> int:
    """A batch's logits in float32, with the log-softmax and the probabilities beside them, per model."""
    vocab = getattr(config, "vocab_size", 0) or 0
    return 3 * copies * batch_size * seq_len * int(vocab) * 4


Setter = Callable[..., str]


def option_setter(key: str, value: str | None = None) -> str:
    """A setting as the command line writes it: --dtype bfloat16."""
    return f"--{key.replace('_', '-')}" + (f" {value}" if value is not None else "")


def recipe_setter(section: str) -> Setter:
    """A setting as a recipe writes it: score.dtype: bfloat16."""
    return lambda key, value=None: f"{section}.{key}" + (f": {value}" if value is not None else "")


def memory_fixes(setter: Setter, *, dtype: str, tokens: tuple[str, ...] = (), device_map: str | None = "",
                 ) -> list[str]:
    """The changes that lower a stage's peak, as the user writes them, and only those that would: bfloat16 where
    the stage computes in float32, a device_map where the stage has one, none is set and there are GPUs to spread
    over, and `tokens`: the token budgets the stage's working memory grows with."""
    fixes = []
    if dtype == "float32":
        fixes.append(f"{setter('dtype', 'bfloat16')} halves the weights")
    if device_map is None and _has_gpu():
        fixes.append(setter("device_map", "auto") + " spreads them over the GPUs and the CPU")
    if tokens:
        fixes.append("fewer " + " or ".join(setter(key) for key in tokens))
    return fixes


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def streamed_part_bytes(source, dtype: str) -> dict[str, int]:
    """Bytes in the compute dtype of what a streamed model (streaming.py) reads at once: its largest decoder layer,
    the embedding and the output head (the embedding again where they are tied). From config.json where it is a
    table architecture's, else from the tensor headers (an lpconvert export, whose pairs are wider layers)."""
    size = DTYPE_BYTES[dtype]
    parts = config_parts(source.config)
    if parts is not None:
        return {"layer": parts["layer"] * size, "embedding": parts["embedding"] * size,
                "head": (parts["head"] or parts["embedding"]) * size}
    layers: dict[str, int] = {}
    found = {"embedding": 0, "head": 0}
    for name, info in source.store.infos().items():
        count = 1
        for dim in info.shape:
            count *= int(dim)
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            layers[layer] = layers.get(layer, 0) + count * size
        elif name.startswith("model.embed_tokens."):
            found["embedding"] += count * size
        elif name.startswith("lm_head."):
            found["head"] += count * size
    return {"layer": max(layers.values(), default=0), "embedding": found["embedding"],
            "head": found["head"] or found["embedding"]}


def streamed_weights(sources, dtype: str, keep: int = 2, at_once: int = 2) -> int:
    """The most weight bytes streamed models hold at once: `at_once` of their largest parts, where a model caches up
    to `keep` layers (streaming.KEEP: a pair's two layers; eval keeps one of each of its two models)."""
    sizes = []
    for source in sources:
        parts = streamed_part_bytes(source, dtype)
        sizes += [parts["layer"]] * keep + [parts["embedding"], parts["head"]]
    sizes.sort(reverse=True)
    return sum(sizes[:at_once])


def _size(n: int) -> str:
    """GiB, or MiB below a tenth of one (a small model's layer is not "0.0 GiB")."""
    return gib(n) if n >= GIB // 10 else f"{n / 2**20:.0f} MiB"


def memory_plan(source, *, dtype: str, load: str, working: int, copies: int = 1, others=(), keep: int = 2) -> str:
    """One line a stage prints before its work: what it will hold and the peak it expects."""
    if load == "whole":
        parameters = parameters_of(source) or 0
        weights = copies * parameters * DTYPE_BYTES.get(dtype, 4)
        held = f"the whole model{'s' if copies > 1 else ''} {_size(weights)}"
    else:
        parts = streamed_part_bytes(source, dtype)
        weights = streamed_weights([source, *others], dtype, keep)
        held = (f"a layer at a time ({_size(parts['layer'])} per layer, embedding {_size(parts['embedding'])}, "
                f"head {_size(parts['head'])} in {dtype}; at most {_size(weights)} at once)")
    total = weights + working + int(MARGIN_FRACTION * weights) + MARGIN_BYTES
    return f"memory: {held} + {_size(working)} working (activations, logits, the stage's own); " \
           f"expected peak about {_size(total)}"


def check_fits(source, *, stage: str, dtype: str, device: str, copies: int = 1, working: int = 0,
               fixes: list[str] | None = None, spread: bool = False,
               second: str = "the converted model", load: str = "whole", others=(), keep: int = 2) -> Estimate | None:
    """Refuse in one line when `stage`'s estimated peak exceeds what `device` has (all devices and the CPU with
    `spread`, a device_map). `copies`: models held at once (eval: 2; `second` names the other); `working`: the stage's own bytes beyond the
    weights; `fixes`: what lowers the peak, as the user writes it (memory_fixes). Returns the estimate, or None
    where none can be made (no parameter count, an unknown device) or LPCONVERT_SKIP_MEMORY_CHECK is set."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return None
    parameters = parameters_of(source)
    if not parameters or dtype not in DTYPE_BYTES:
        return None
    found = estimate(parameters, dtype, copies, working)
    if load == "stream":  # a layer at a time (`others`: models streamed beside it, eval's converted one)
        weights = streamed_weights([source, *others], dtype, keep)
        found = Estimate(parameters, weights, working, int(MARGIN_FRACTION * weights) + MARGIN_BYTES)
    have = available_memory(device, spread)
    if have is None or found.total <= have[0]:
        return found
    held = f" and {second}" if copies == 2 else f" {copies} times" if copies > 2 else ""
    count = f"{copies} x " if copies > 1 else ""
    if load == "stream":
        raise LPError(f"{stage} would need about {gib(found.total)} to run {source.name}{held} a layer at a time "
                      f"({gib(found.weights)} of weights in {dtype} at once + {gib(found.working)} working + "
                      f"{gib(found.margin)} margin), more than the {gib(have[0])} {have[1]}",
                      f"{'; '.join(fixes or []) or 'run on a machine with more memory'}; {SKIP_ENV}=1 tries anyway")
    working_text = f" + {gib(found.working)} working" if found.working >= GIB // 10 else ""
    fix_text = "; ".join(fixes or []) or "run on a machine with more memory"
    raise LPError(f"{stage} would need about {gib(found.total)} to hold {source.name}{held} "
                  f"({count}{parameters / 1e9:.2f}B parameters in {dtype}: {gib(found.weights)}{working_text} + "
                  f"{gib(found.margin)} margin), more than the {gib(have[0])} {have[1]}",
                  f"{fix_text}; {SKIP_ENV}=1 tries anyway")
