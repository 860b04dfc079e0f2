"""Local Hugging Face model folders: config.json, the weights and the tokenizer files.

- `read_config_json` reads config.json as a JSON object; `load_lp_config` loads an lpconvert
  export's config with lpconvert's own packaged configuration class; `load_hf_config` loads any
  other through transformers, and refuses one that needs custom code unless `trust_remote_code`;
- `open_weights` opens safetensors lazily (every shard validated), or else reads
  pytorch_model.bin, sharded or not, with `torch.load(weights_only=True)`: no pickled code runs;
- `tokenizer_folder` says whether the folder holds tokenizer files.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import MemoryStore, SafetensorsStore, TensorStore, shard_path
from .errors import LPError
from .quiet import first_line, quiet_transformers

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# A tokenizer's files: any of them marks a folder as holding a tokenizer, and export copies all it finds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def read_config_json(folder: Path) -> dict:
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LPError(f"{file} is not valid JSON ({exc.__class__.__name__})",
                      "fix or re-download config.json") from None
    except OSError as exc:
        raise LPError(f"cannot read {file}: {exc.strerror or exc}", "check the file's permissions") from None
    if not isinstance(raw, dict):
        raise LPError(f"{file} is not a JSON object", "fix or re-download config.json")
    return raw


def load_hf_config(folder: Path, raw: dict, trust_remote_code: bool):
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = raw.get("model_type")
    if not model_type and "auto_map" not in raw:
        raise LPError(f"{folder / 'config.json'} has no model_type, so it is not a model's config",
                      "use the config.json that came with these weights")
    if not trust_remote_code:
        if "auto_map" in raw:
            raise LPError(f"{folder} needs custom code (auto_map in config.json), which lpconvert does not run "
                          "unless asked", "pass --trust-remote-code if you trust it")
        if model_type not in CONFIG_MAPPING:
            what = f"model_type '{model_type}'" if model_type else "no model_type"
            raise LPError(f"{folder} needs custom code ({what} in config.json is unknown to transformers)",
                          "pass --trust-remote-code if you trust it")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise LPError(f"could not load {folder / 'config.json'}: {first_line(exc)}",
                      "fix or re-download config.json") from None


def load_lp_config(folder: Path):
    from .modeling.configuration_lpconvert import LPConfig

    try:
        return LPConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LPError(f"could not load {folder / 'config.json'} as an lpconvert config: {first_line(exc)}",
                      "re-export the model with lpconvert") from None


def open_weights(folder: Path) -> tuple[TensorStore, list[Path]]:
    """Safetensors (lazy) if there are any, else .bin through torch.load(weights_only=True)."""
    if (folder / "model.safetensors.index.json").exists() or any(folder.glob("*.safetensors")):
        store = SafetensorsStore(folder)  # validates the index and every shard
        return store, store.paths
    if (folder / BIN_INDEX_NAME).exists():
        files = _bin_shards(folder)
    elif (folder / BIN_NAME).exists():
        files = [folder / BIN_NAME]
    else:
        raise LPError(f"{folder} has no weights (no *.safetensors, {BIN_NAME} or {BIN_INDEX_NAME})",
                      "download the model's weight files into the folder")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_load_bin(file))
    return MemoryStore(tensors), files


def _bin_shards(folder: Path) -> list[Path]:
    index = folder / BIN_INDEX_NAME
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise LPError(f"{index} is not a valid checkpoint index", "re-download the checkpoint") from None
    # Checked by name, links followed: in the Hugging Face cache every shard is a link into ../../blobs/.
    return [shard_path(folder, shard, BIN_INDEX_NAME) for shard in shards]


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise LPError(f"{file.name} is a pickle that holds more than tensors (it calls {found.group(1)}), "
                          "and lpconvert does not run pickled code",
                          "convert it to safetensors with a tool you trust") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
        raise LPError(f"{file.name} is not a valid PyTorch checkpoint of tensors"
                      + (f": {detail.group(1).strip()}" if detail else ""), "re-download the checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LPError(f"{file.name} is not a valid PyTorch checkpoint: {first_line(exc)}",
                      "re-download the checkpoint") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(t, torch.Tensor) for t in data.values()):
        raise LPError(f"{file.name} does not hold a state dict of tensors", "re-save it with model.state_dict()")
    return {str(k): t for k, t in data.items()}


def tokenizer_folder(folder: Path) -> Path | None:
    return folder if any((folder / f).exists() for f in TOKENIZER_FILES) else None
