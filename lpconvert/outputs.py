"""Where lpconvert writes, and its promise never to lose a user's data.

- An output that is the source model, contains it or lies inside it (symlinks followed) is refused
  before anything is written or removed: `-o <folder holding MODEL> --overwrite` would otherwise
  delete the model it reads.
- `--overwrite` removes only a folder lpconvert itself wrote (its config.json carries `lp_source`)
  or an empty one; any other folder is refused, whatever it holds. Likewise a GGUF file, a heal file
  and its report (`OwnedFile`) are replaced only when lpconvert wrote them, and a heal output never
  goes into a model folder.
- Folders are built in a temporary folder beside OUT and renamed into place at the end; files are
  written to a temporary file and renamed over the target. An interrupted run leaves OUT as it was.
- A new folder gets the mode `mkdir` would give it under the user's umask: the temporary folder's
  0700 would otherwise hide the model from other users and from serving containers.

Every OS refusal (a path under a file, a name too long, no permission) is one LPError line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LPError

MARKER_KEY = "lp_source"  # config.json of every folder export and convert write


def protected_paths(source) -> list[Path]:
    """The files and folders of a resolved model source that no output may touch."""
    paths = [Path(source.path)]
    paths += [Path(p) for p in getattr(source, "weight_files", []) or []]
    if getattr(source, "tokenizer_path", None):
        paths.append(Path(source.tokenizer_path))
    return paths


def _real(path: Path) -> Path:
    """The absolute path with every symlink followed, as far as it exists."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError) as exc:
        raise LPError(f"cannot resolve the path {path}: {exc}", "choose another path") from None


def _os_problem(path: Path, exc: OSError) -> LPError:
    reason = exc.strerror or str(exc)
    return LPError(f"cannot use {path} as an output path: {reason}", "choose a path in a writable folder")


def _overlap(out: Path, protected: Iterable[Path]) -> str | None:
    """How `out` overlaps a protected path, if it does, in words."""
    real_out = _real(out)
    for path in protected:
        for candidate in {Path(os.path.abspath(path)), _real(path)}:
            if real_out == candidate:
                return f"is the source model ({path})"
            if real_out in candidate.parents:
                return f"contains the source model ({path})"
            if candidate in real_out.parents:
                return f"lies inside the source model ({path})"
    return None


def _check_not_working_folder(out: Path) -> None:
    cwd = _real(Path.cwd())
    real_out = _real(out)
    if real_out == cwd or real_out in cwd.parents:
        where = "the current folder" if real_out == cwd else "a folder that contains the current folder"
        raise LPError(f"output path '{out}' is {where}", "give a new folder name, e.g. -o converted-model")


def _check_parent(out: Path) -> Path:
    parent = _real(out).parent
    if not parent.exists():
        raise LPError(f"the parent folder of {out} does not exist", f"create {parent} first")
    if not parent.is_dir():
        raise LPError(f"cannot write {out}: {parent} is a file, not a folder", "choose a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LPError(f"cannot write into {parent}", "choose a writable output path")
    _probe_creatable(parent)
    return parent


def _probe_creatable(parent: Path) -> None:
    """Create and remove an empty file in `parent`: for root os.access says yes even where nothing can
    be created (/proc, a read-only mount), and the refusal must come before the work, not after it."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lpconvert-probe-", dir=parent)
    except OSError as exc:
        raise LPError(f"cannot create files in {parent}: {exc.strerror or exc}",
                      "choose an output path in a writable folder") from None
    os.close(fd)
    os.unlink(name)


# Every name export and convert write. A folder holding anything else (notes, a .git of a cloned
# model, a subfolder) is not lpconvert's alone, and --overwrite will not remove it.
WRITTEN_NAMES = re.compile(
    r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|config\.json|"
    r"configuration_lpconvert\.py|modeling_lpconvert\.py|generation_config\.json|README\.md|"
    r"lpconvert-[\w.-]+\.(json|yaml)|lpconvert-heal\.safetensors|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"tokenizer\.model|vocab\.json|merges\.txt|added_tokens\.json|chat_template\.(jinja|json)|model\.gguf")


def written_by_lpconvert(folder: Path) -> bool:
    """A folder that export or convert wrote: its config.json names the source it came from."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get(MARKER_KEY), dict)


def foreign_entries(folder: Path) -> list[str]:
    """What a folder holds that lpconvert never writes."""
    try:
        return sorted(p.name for p in folder.iterdir() if not (p.is_file() and WRITTEN_NAMES.fullmatch(p.name)))
    except OSError:
        return ["(unreadable)"]


def _is_empty_folder(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def check_output_folder(out: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse an output folder that can't be written, or that would lose data if it were."""
    out = Path(out)
    try:
        _check_not_working_folder(out)
        overlap = _overlap(out, protect)
        if overlap:
            raise LPError(f"output path {out} {overlap}",
                          "write the converted model to a new folder outside the source")
        if out.is_symlink():
            raise LPError(f"output path {out} is a symbolic link", "give the real path of the folder")
        if out.exists() and not out.is_dir():
            raise LPError(f"output path {out} exists and is a file", "choose a folder path")
        if out.exists():
            if not overwrite:
                raise LPError(f"output folder {out} already exists", "pass --overwrite or choose another path")
            if not (written_by_lpconvert(out) or _is_empty_folder(out)):
                raise LPError(f"output folder {out} was not written by lpconvert, so --overwrite will not remove it",
                              "choose a new output path, or remove the folder yourself")
            if foreign := foreign_entries(out):
                raise LPError(f"output folder {out} holds {', '.join(foreign[:3])}"
                              f"{' and more' if len(foreign) > 3 else ''}, which lpconvert did not write, so "
                              "--overwrite will not remove it", "move those out, or choose a new output path")
        _check_parent(out)
        os.stat(out.parent / (out.name + ".lpconvert-tmp"), follow_symlinks=False)
    except FileNotFoundError:
        pass  # the probe above: the name is valid, nothing is there
    except OSError as exc:  # a name too long, a path under a file, a loop...
        raise _os_problem(out, exc) from None


def check_output_file(path: Path, protect: Iterable[Path] = (), inputs: Iterable[Path] = ()) -> None:
    """Refuse an output file that can't be written, that is one of the source's own files (`protect`),
    or that is a file the command reads (`inputs`: a calibration text, a scores file)."""
    path = Path(path)
    try:
        if path.exists() and path.is_dir():
            raise LPError(f"output {path} is a folder", f"give a file path such as {path / 'out.json'}")
        if path.exists() and not path.is_file():  # the atomic rename would put a file where the device was
            raise LPError(f"output {path} exists and is not a regular file (a device, a pipe or a socket)",
                          "write to a new file or to a regular file")
        real = _real(path)
        for protected in protect:
            root = _real(protected)
            if path.exists() and (real == root or root in real.parents):
                raise LPError(f"output {path} is a file of the source model ({protected})",
                              "write it outside the model folder, or under a new name")
        for read in inputs:
            if path.exists() and real == _real(read):
                raise LPError(f"output {path} is a file this command reads", "write the result under a new name")
        _check_parent(path)
        os.stat(path.parent / f".{path.name}.tmp", follow_symlinks=False)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_problem(path, exc) from None


def written_gguf(path: Path) -> bool:
    """A GGUF file that lpconvert's GGUF export wrote (its metadata holds lpconvert.version)."""
    from .ggufhead import read_gguf_head

    try:
        return "lpconvert.version" in read_gguf_head(path)
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class OwnedFile:
    """A kind of file lpconvert writes whole and may replace with --overwrite, but only one it wrote."""

    what: str  # in messages: "GGUF", "heal file"
    suffix: str  # ".gguf"
    example: str  # the name a fix suggests when the path has none: "model"
    written: Callable[[Path], bool]  # whether lpconvert wrote the file at this path
    fix: str  # where to write it instead
    outside_model_folders: bool = False  # refused in any model folder, not only the source's


def check_owned_output(path: Path, kind: OwnedFile, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse an output file of `kind` that can't be written, or whose current file would be lost."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(kind.suffix) or name == kind.suffix:
        problem = "has no name before" if name == kind.suffix else "does not end in"
        raise LPError(f"output {path} {problem} {kind.suffix}: a {kind.what} is written as NAME{kind.suffix}",
                      f"name the file, e.g. -o {_named(path, kind)}")
    if path.is_dir():
        raise LPError(f"output {path} is a folder", f"give a file path such as {path / (kind.example + kind.suffix)}")
    protect = list(protect)
    try:
        overlap = _overlap(path, protect)
        folder = _model_folder_of(path) if kind.outside_model_folders else None
    except OSError as exc:
        raise _os_problem(path, exc) from None
    if overlap:  # a file inside the model's folder too, as for folder outputs: a Hub cache is no place for it
        raise LPError(f"output path {path} {overlap}", kind.fix)
    if folder is not None:
        raise LPError(f"output {path} is inside the model folder {folder}, where a {kind.what} could be read as part "
                      "of that model or replace one of its files", kind.fix)
    check_output_file(path, protect)
    if path.is_symlink():
        raise LPError(f"output path {path} is a symbolic link", "give the real path of the file")
    if path.exists():
        if not overwrite:
            raise LPError(f"{kind.what} {path} already exists", "pass --overwrite or choose another path")
        if not kind.written(path):
            raise LPError(f"{kind.what} {path} was not written by lpconvert, so --overwrite will not replace it",
                          "choose a new output path, or remove the file yourself")


def _named(path: Path, kind: OwnedFile) -> Path:
    """The path a fix suggests: out.json -> out.safetensors, .safetensors -> heal.safetensors."""
    stem = path.name[: -len(kind.suffix)] if path.name.lower().endswith(kind.suffix) else Path(path.name).stem
    return path.parent / ((stem or kind.example) + kind.suffix)


# The files that make a folder a model's: lpconvert's outputs never go beside them (the source reader
# takes every *.safetensors of a folder without an index as part of the model).
MODEL_FOLDER_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def _model_folder_of(path: Path) -> Path | None:
    """The folder holding `path`, if it is a model's."""
    folder = _real(path).parent
    return folder if any((folder / name).exists() for name in MODEL_FOLDER_FILES) else None


GGUF_OUTPUT = OwnedFile("GGUF", ".gguf", "model", written_gguf, "write the GGUF outside the source model's folder")


def check_output_gguf(path: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse a GGUF output path that can't be written, or whose file would be lost if it were."""
    check_owned_output(path, GGUF_OUTPUT, overwrite, protect)


@contextlib.contextmanager
def atomic_output_file(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        # a fresh name: two runs writing the same output never share a temporary file, nor follow a link
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_real(path).parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # what open() would have made, not mkstemp's 0600
        tmp.replace(path)
    except OSError as exc:
        _remove(tmp)
        raise _os_problem(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, strict_json(data) + "\n")


def strict_json(data, **options) -> str:
    """JSON that every reader parses: NaN and Infinity (a broken model's perplexity), which Python writes but
    JSON has no words for, become null; the report's failures say what they were."""
    return json.dumps(_finite_or_none(data), indent=2, allow_nan=False, **options)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _umask() -> int:
    mask = os.umask(0o022)  # read it: the only portable way is to set and restore it
    os.umask(mask)
    return mask


def _make_temporary_folder(out: Path) -> Path:
    parent = _real(out).parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lpconvert-tmp-", dir=parent))
    except OSError as exc:
        raise _os_problem(out, exc) from None
    try:
        tmp.chmod(0o777 & ~_umask())  # what mkdir would have made, not mkdtemp's 0700
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_problem(out, exc) from None
    return tmp


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; rename it to OUT only if the block succeeds.

    SIGTERM is turned into KeyboardInterrupt meanwhile, so an interrupted export (Ctrl-C or a CI
    timeout) removes the temporary folder and leaves OUT as it was. OUT is checked again here, just
    before anything is written, for callers of the library.
    """
    out = Path(out)
    protect = list(protect)
    check_output_folder(out, overwrite, protect)
    tmp = _make_temporary_folder(out)
    try:
        with sigterm_as_interrupt():
            yield tmp
        _move_into_place(tmp, out, overwrite, protect)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LPError(f"disk full while writing {out}; nothing was left behind",
                          "free space or choose another output path") from None
        if exc.filename is not None and Path(exc.filename).parent == _real(out).parent:
            raise _os_problem(out, exc) from None  # the rename into place (a busy mount point, a permission)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the block (main thread only), so an interrupted write (Ctrl-C
    or a CI timeout) runs its cleanup and removes what it had written."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _move_into_place(tmp: Path, out: Path, overwrite: bool, protect: list[Path]) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    # The folder may have changed while we wrote: check once more before removing anything.
    check_output_folder(out, overwrite, protect)
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.lpconvert-old-", dir=_real(out).parent))
    old = holder / out.name
    try:
        with _signals_held():  # between the two renames OUT is missing: finish them before an interrupt lands
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)  # put the old folder back: OUT stays as it was
                raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (in the main thread; elsewhere nothing to hold)."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
