"""Running a GGUF in llama.cpp, through llama-cpp-python (the optional extra `lpconvert[llamacpp]`).

Used to check a GGUF export against the same model in transformers (tests, scripts/results/gguf_bench.py)
and to measure it where people run it: `GgufModel` is an lpconvert GGUF export as eval and bench
take a model (its provenance from the file's lpconvert.* metadata, a model whose forward and greedy
generate run in llama.cpp). `exact=True` asks llama.cpp for what the comparison needs:
a float32 KV cache and no flash attention (the default f16 cache and flash attention each cost
about 1e-3 relative on the logits, on an unpaired model as much as on a paired one).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .checks import shown
from .errors import LPError
from .llamacppworker import LlamaProcess

INSTALL = "pip install 'lpconvert[llamacpp]' (llama-cpp-python 0.3.36, built from source in 5-9 minutes)"


def check_installed() -> None:
    """llama-cpp-python is there (found, not imported: its native library loads in llama.cpp's own process only)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise LPError("llama-cpp-python is not installed, and running a GGUF needs it", INSTALL)


def gguf_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata (arrays other than per-layer widths left out)."""
    from gguf import GGUFReader

    fields = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        fields[key] = field.contents()
    return fields


@contextlib.contextmanager
def open_gguf(path: Path, *, n_ctx: int = 2048, n_threads: int | None = None, exact: bool = True,
              logits_all: bool = False) -> Iterator[LlamaProcess]:
    """llama.cpp on `path`, in a child process (llamacppworker: a native crash is an LPError, not a dead
    lpconvert), stopped on exit."""
    check_installed()
    options = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads or os.cpu_count(), verbose=False,
                   logits_all=logits_all)
    if exact:
        options.update(type_k=0, type_v=0, flash_attn=False)  # GGML_TYPE_F32 KV cache
    llm = LlamaProcess(path, options)
    try:
        yield llm
    finally:
        llm.close()


def logits(llm: LlamaProcess, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` in one fresh sequence (the model opened with logits_all)."""
    return llm.logits(ids)


def greedy(llm: LlamaProcess, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` (argmax at every step, KV cache reused)."""
    return llm.greedy(ids, new_tokens)


def decode_seconds(llm: LlamaProcess, prompt: list[int], new_tokens: int) -> float:
    """Seconds to decode `new_tokens` one at a time after `prompt` (prefill not counted; timed in the child)."""
    return llm.decode_seconds(prompt, new_tokens)


def nll(llm: LlamaProcess, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes each, and the count."""
    return llm.nll(ids)


# ----------------------------------------------------------------------------------------------
# An exported GGUF as eval and bench take a model


class LlamaCppLM:
    """A llama.cpp model with the two calls eval and bench make of a transformers one: a forward that
    returns `.logits` and a greedy `generate`. Rows of a batch run one after another."""

    def __init__(self, path: Path, max_positions: int, vocab_size: int, n_threads: int | None = None,
                 all_logits: bool = True):
        self.path, self.max_positions, self.n_threads = path, max_positions, n_threads
        self.all_logits = all_logits  # False: only the last position's (bench: a prefill computes no others)
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self._closing, self.llm, self.n_ctx = contextlib.ExitStack(), None, 0
        self._ready(1)  # loaded now, as a transformers model is by load_model: not inside a timed call

    def _ready(self, tokens: int):
        """The model opened with room for `tokens` positions. llama-cpp-python keeps n_ctx x vocab logits
        (200 MB at 1024 x 49k), so the context grows to what the calls need, not the model's maximum."""
        if tokens > self.n_ctx:
            self.close()
            self.n_ctx = min(self.max_positions, max(1024, 1 << (tokens - 1).bit_length()))
            self.llm = self._closing.enter_context(open_gguf(self.path, n_ctx=self.n_ctx, exact=False,
                                                             logits_all=self.all_logits, n_threads=self.n_threads))
            self.llm.start([0])  # llama.cpp allocates its compute buffers on the first call: not in a timed one
        return self.llm

    def close(self) -> None:
        self._closing.close()
        self.llm, self.n_ctx = None, 0

    def __call__(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep: int = 0, **_):
        import torch

        llm = self._ready(input_ids.shape[1])
        if not self.all_logits:
            if logits_to_keep != 1:
                raise ValueError("opened without all logits: call with logits_to_keep=1")
            return SimpleNamespace(logits=torch.stack([torch.from_numpy(llm.last_logits(row.tolist()))
                                                       for row in input_ids]))
        out = torch.stack([torch.from_numpy(llm.logits(row.tolist())) for row in input_ids])
        return SimpleNamespace(logits=out[:, -logits_to_keep:] if logits_to_keep else out)

    def generate(self, input_ids, max_new_tokens: int, min_new_tokens: int = 0, attention_mask=None,
                 streamer=None, **_):
        """Greedy; stops at the end-of-text token once min_new_tokens are out (as transformers does). A
        `streamer` is told the prompt, then each new token; one with `put_at` (bench's clock) is told when each
        came out by llama.cpp's process, so no pipe round trip falls inside a timed step."""
        import torch

        llm = self._ready(input_ids.shape[1] + max_new_tokens)
        rows = []
        for row in input_ids:
            ids = row.tolist()
            if streamer is not None:
                streamer.put(row[None])
            new, clock = llm.greedy_clocked(ids, max_new_tokens, min_new_tokens)
            for token, when in zip(new, clock, strict=True):
                if hasattr(streamer, "put_at"):
                    streamer.put_at(torch.tensor([token]), when)
                elif streamer is not None:
                    streamer.put(torch.tensor([token]))
            rows.append(torch.tensor(ids + new))
        if streamer is not None:
            streamer.end()
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


@dataclass
class GgufModel:
    """An lpconvert GGUF export, as eval and bench take a model source."""

    name: str
    path: Path
    config: SimpleNamespace
    kind: str = "llama.cpp"
    tokenizer_path: Path | None = None  # the tokenizer is inside the file; the source's is used
    n_threads: int | None = None
    all_logits: bool = True  # bench sets False: it reads the last position's logits only

    def load_model(self, dtype=None, device: str = "cpu", **_) -> LlamaCppLM:
        return LlamaCppLM(self.path, self.config.max_position_embeddings, self.config.vocab_size, self.n_threads,
                          self.all_logits)


def open_exported_gguf(name: str) -> GgufModel | None:
    """NAME as an lpconvert GGUF export, its provenance read from its metadata; None when NAME is not one
    (not a .gguf file, or a GGUF lpconvert did not write)."""
    from .ggufhead import read_gguf_head

    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    try:
        meta = read_gguf_head(path)
    except (OSError, ValueError):
        return None
    if "lpconvert.version" not in meta:
        return None
    check_installed()
    return GgufModel(name=name, path=path, config=exported_config(ExportMetadata(path, meta)))


EXPORTED_ARCH = "deci"  # ggufexport.GGUF_ARCH: the llama.cpp architecture every lpconvert GGUF declares


def exported_config(read: ExportMetadata) -> SimpleNamespace:
    """What eval and bench need of an lpconvert GGUF: sizes and provenance, every entry checked."""
    arch = read.value("general.architecture", str)
    if arch != EXPORTED_ARCH:
        raise read.broken(f"its general.architecture is {shown(arch)}, not '{EXPORTED_ARCH}'")
    lp_source = {"name": read.value("lpconvert.source", str), "fingerprint": read.plan_source()}
    if "lpconvert.content_sha256" in read.meta:
        lp_source["content_sha256"] = read.value("lpconvert.content_sha256", str)
    return SimpleNamespace(model_type=arch, vocab_size=read.value(f"{arch}.vocab_size", int),
                           num_hidden_layers=read.value(f"{arch}.block_count", int),
                           max_position_embeddings=read.value(f"{arch}.context_length", int), lp_source=lp_source)


@dataclass
class ExportMetadata:
    """The head of an lpconvert GGUF (ggufhead.read_gguf_head), read entry by entry: an entry that is missing
    or not what ggufexport writes (the file edited, or damaged) is one line naming the file and the key."""

    path: Path
    meta: dict

    def broken(self, what: str) -> LPError:
        return LPError(f"{self.path} is an lpconvert GGUF whose metadata is damaged: {what}",
                       f"re-export it with `lpconvert export SOURCE --plan PLAN -o {self.path.name}`")

    def value(self, key: str, kind: type):
        """META[KEY] if it is a string (KIND str) or a positive integer (KIND int)."""
        if key not in self.meta:
            raise self.broken(f"it has no {key} entry")
        value = self.meta[key]
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise self.broken(f"its {key} is {shown(value)}, not a positive integer")
        if kind is str and not isinstance(value, str):
            raise self.broken(f"its {key} is {shown(value)}, not a string")
        return value

    def plan_source(self) -> dict:
        """The fingerprint of the source, from the plan JSON in lpconvert.plan."""
        text = self.value("lpconvert.plan", str)
        try:
            plan = json.loads(text)
        except RecursionError:
            raise self.broken("its lpconvert.plan is nested too deeply to be a plan") from None
        except ValueError:  # JSONDecodeError
            raise self.broken(f"its lpconvert.plan is not JSON: {shown(text)}") from None
        if not isinstance(plan, dict) or not isinstance(plan.get("source"), dict):
            raise self.broken(f"its lpconvert.plan is not a plan (a JSON object with a source): {shown(text)}")
        return plan["source"]
