"""The Hugging Face Hub as lpconvert reads it: repo ids, the cache folder and offline mode.

`looks_like_hub_id` tells a Hub id (``org/name``) from a path; `snapshot_hub_id` reads the id back
from a folder of the Hub cache. `hub_cache_dir` and `hub_offline` read the environment when they
are called, not when huggingface_hub was imported. Fetching a repo (lpconvert.sources) downloads
only the files matching `HUB_PATTERNS`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
# What a Hub repo id looks like: one or two components of [A-Za-z0-9_.-], no leading '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.lower().endswith((".gguf", ".json", ".safetensors", ".bin"))


def snapshot_hub_id(folder: Path) -> str | None:
    """org/name for a folder of the Hugging Face cache (.../models--org--name/snapshots/<rev>), else None.

    huggingface_hub names a repo's cache folder models--{org}--{name}, and Hub ids cannot contain
    '--', so the id can be read back from the path.
    """
    parts = Path(os.path.abspath(folder)).parts  # made absolute, but links kept: the cache path is the name
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    repo_id = "/".join(parts[-3].removeprefix("models--").split("--"))
    return repo_id if _HUB_ID.match(repo_id) else None


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, from the environment as it is now.

    huggingface_hub reads these variables once, when it is imported, into its constants; reading
    them here (and passing cache_dir) makes a later change count, as in tests and long-lived callers.
    """
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, with huggingface_hub's reading of true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")
