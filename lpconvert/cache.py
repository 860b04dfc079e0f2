"""lpconvert's user cache: where it is, and how a folder is built into it safely.

`cache_dir` is $LPCONVERT_CACHE, else $XDG_CACHE_HOME/lpconvert, else ~/.cache/lpconvert.
`build_cached_folder` builds in a temporary folder beside its target and renames it into place,
so an interrupted build leaves nothing behind and concurrent builders end with one complete
folder. The built-in smollm2-135m (lpconvert.sources) is converted into it once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import LPError


def cache_dir() -> Path:
    """lpconvert's user cache: $LPCONVERT_CACHE, else $XDG_CACHE_HOME/lpconvert, else ~/.cache/lpconvert."""
    if os.environ.get("LPCONVERT_CACHE"):
        return Path(os.environ["LPCONVERT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lpconvert"
    return Path.home() / ".cache" / "lpconvert"


def build_cached_folder(target: Path, build: Callable[[Path], None],
                        is_complete: Callable[[Path], bool]) -> Path:
    """Run `build(tmp)` on a temporary folder beside TARGET, then rename it into place.

    An interrupted build leaves nothing behind; a concurrent builder that got there first wins and
    its folder is used. A TARGET that exists but is incomplete is replaced.
    """
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the cache folder's mode
    except OSError as exc:
        raise LPError(f"cannot write the lpconvert cache {parent}: {exc.strerror or exc}",
                      "set LPCONVERT_CACHE to a writable folder") from None
    try:
        build(tmp)
        if target.exists() and not is_complete(target):
            broken = Path(tempfile.mkdtemp(prefix=f".{target.name}.broken-", dir=parent))
            with contextlib.suppress(OSError):
                target.rename(broken / target.name)
            shutil.rmtree(broken, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
