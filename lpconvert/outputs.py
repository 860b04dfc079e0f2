"""Where lpconvert writes, and its promise never to lose a user's data.

- An output that is the source model, contains it or lies inside it (symlinks followed) is refused
  before anything is written or removed: `-o <folder holding MODEL> --overwrite` would otherwise
  delete the model it reads.
- `--overwrite` removes only a folder lpconvert itself wrote (its config.json carries `lp_source`)
  or an empty one; any other folder is refused, whatever it holds.
- One rule for every output file of every command (scores, plans, heal files and reports, GGUFs,
  plots: `OwnedFile`, `check_owned_output`): never a link (written through, it would replace what it
  points at), never a file of the source or one the command reads (compared by device and inode, so
  hard links count), never inside a model folder of any kind (Hugging Face, GGUF, PEFT adapter, Meta
  consolidated.*.pth, or a folder under one), never over a file lpconvert did not write; replacing
  one it did write needs --overwrite.
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
import stat
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
        found = model_folder_of(out, gguf=False)
        if found is not None:
            raise LPError(f"output folder {out} is inside the model folder {found[0]} ({found[1]})",
                          "write the converted model to a new folder outside any model folder")
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


# ----------------------------------------------------------------------------------------------
# Output files: one rule for every file every command writes (scores, plans, heal files and their
# reports, GGUFs, plots).


@dataclass(frozen=True)
class OwnedFile:
    """A kind of file lpconvert writes whole and may replace with --overwrite, but only one it wrote.

    How lpconvert knows it wrote a file (`written`): its JSON's "kind" starts with lpconvert- (scores,
    plans, reports), a heal file's or a GGUF's metadata names lpconvert, a plot carries the marker
    plots.PLOT_MARKER (a PNG text chunk, the SVG's description, the PDF's subject)."""

    what: str  # in messages: "GGUF", "heal file", "picture"
    suffixes: tuple[str, ...]  # the names it may have (".gguf",); () for any name
    example: str  # the name a fix suggests: "model.gguf", "scores.png"
    written: Callable[[Path], bool]  # whether lpconvert wrote the file at this path
    fix: str  # where to write it instead of a model folder
    option: str = "-o"  # how the path is given, in fixes
    stream_fix: str = "give the path of a file"  # the fix for -o /dev/stdout and other streams
    outside_model_folders: bool = True  # refused in any model folder, not only the source's


def written_json(path: Path) -> bool:
    """A JSON file lpconvert wrote: an object whose "kind" starts with lpconvert- (scores, plan, heal report)."""
    try:
        if os.stat(path).st_size > MAX_OWNED_JSON_BYTES:
            return False
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("kind"), str) and data["kind"].startswith("lpconvert-")


MAX_OWNED_JSON_BYTES = 256 * 2**20  # a scores or plan file is kilobytes to megabytes; a larger file is not one

SCORES_OUTPUT = OwnedFile("scores file", (), "scores.json", written_json,
                          "write the scores outside any model folder, e.g. -o scores.json",
                          stream_fix="give the path of a file; --json prints a summary on stdout")
PLAN_OUTPUT = OwnedFile("plan file", (), "plan.json", written_json,
                        "write the plan outside any model folder, e.g. -o plan.json",
                        stream_fix="give the path of a file, or pass --json to print the plan on stdout")


def written_gguf(path: Path) -> bool:
    """A GGUF file that lpconvert's GGUF export wrote (its metadata holds lpconvert.version)."""
    from .ggufhead import read_gguf_head

    try:
        return "lpconvert.version" in read_gguf_head(path)
    except (OSError, ValueError):
        return False


# A GGUF is one self-contained file that no other model's reader picks up: convert writes one beside the
# export folder's files, and GGUFs sit side by side. Only the source's own folder is refused for it.
GGUF_OUTPUT = OwnedFile("GGUF", (".gguf",), "model.gguf", written_gguf,
                        "write the GGUF outside the source model's folder", outside_model_folders=False)


def check_output_gguf(path: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse a GGUF output path that can't be written, or whose file would be lost if it were."""
    check_owned_output(path, GGUF_OUTPUT, overwrite, protect)


def check_owned_output(path: Path, kind: OwnedFile, overwrite: bool, protect: Iterable[Path] = (),
                       inputs: Iterable[Path] = (), beside: Path | None = None) -> None:
    """Refuse an output file of `kind` that can't be written, or whose writing would lose data:

    - a name that is not one of the kind's (a picture's .png, .pdf or .svg), a folder, a device or pipe;
    - a symbolic link, whatever it points at: outputs are renamed into place, never written through a link;
    - a file of the source model or one the command reads (`protect`, `inputs`), compared by identity
      (device and inode), so a hard link is found whatever its name;
    - a path in a model's folder or any folder under one (`model_folder_of`), the source's or another's
      (for a GGUF, the source's only);
    - an existing file without --overwrite, and with it one lpconvert did not write.

    `beside`: the output whose name this path was derived from (a heal file's report), for messages."""
    path = Path(path)
    protect = [Path(p) for p in protect]
    _check_name(path, kind, beside)
    try:
        if path.is_symlink():
            raise _link_refused(path, kind)
        if path.is_dir():
            if beside is not None:
                raise LPError(f"{kind.what} {path}, written beside {beside}, is a folder",
                              f"move that folder away, or give {kind.option} another name")
            raise LPError(f"output {path} is a folder", f"give a file path such as {path / kind.example}")
        exists = path.exists()
        if exists and not path.is_file():  # the atomic rename would put a file where the device was
            raise LPError(f"output {path} exists and is not a regular file (a device, a pipe or a socket)",
                          "write to a new file or to a regular file")
        if exists:
            _check_identity(path, protect, inputs)
        overlap = _overlap(path, protect)
        if overlap:  # a file inside the model's folder too, as for folder outputs: a Hub cache is no place for it
            raise LPError(f"output path {path} {overlap}", kind.fix)
        # A GGUF makes its folder a model folder only for a weights file (a heal file's .safetensors beside it
        # reads as that folder's weights to other tools); scores, plans and pictures may sit beside a GGUF, as
        # they do in the README's working folder.
        found = model_folder_of(path, gguf=path.suffix == ".safetensors") if kind.outside_model_folders else None
        if found is not None:
            folder, evidence = found
            raise LPError(f"output {path} is inside the model folder {folder} ({evidence}), where a {kind.what} "
                          "could be read as part of that model or replace one of its files", kind.fix)
        _check_parent(path)
        os.stat(path.parent / f".{path.name}.tmp", follow_symlinks=False)  # a name too long, a path under a file
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_problem(path, exc) from None
    _check_replaceable(path, kind, overwrite)


def check_file_name(path: Path, kind: OwnedFile) -> None:
    """One LPError line for a name that is not one of the kind's (a picture's NAME.png, NAME.pdf or NAME.svg):
    another suffix, nothing before the suffix (`.png`, `figs/.svg`), or no name at all."""
    _check_name(Path(path), kind, None)


def _check_name(path: Path, kind: OwnedFile, beside: Path | None) -> None:
    if not kind.suffixes or beside is not None:
        return
    name = path.name.lower()
    shown = ", ".join(kind.suffixes)
    names = [f"NAME{s}" for s in kind.suffixes]
    as_names = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if name in ("", ".", ".."):
        raise LPError(f"{kind.option} {path} names no file: a {kind.what} is written as {as_names}",
                      f"name the file, e.g. {kind.option} {path / kind.example}")
    bare = next((s for s in kind.suffixes if name == s), None)
    if bare is not None:
        label = "output" if kind.option == "-o" else kind.option
        raise LPError(f"{label} {path} has no name before {bare}: a {kind.what} is written as NAME{bare}",
                      f"name the file, e.g. {kind.option} {path.parent / (Path(kind.example).stem + bare)}")
    if not any(name.endswith(s) for s in kind.suffixes):
        if len(kind.suffixes) > 1:
            raise LPError(f"{kind.option} {path}: a {kind.what} is written as {shown}",
                          f"e.g. {kind.option} {path.parent / (path.stem + kind.suffixes[0])}")
        raise LPError(f"output {path} does not end in {shown}: a {kind.what} is written as {as_names}",
                      f"name the file, e.g. {kind.option} {path.parent / (path.stem + kind.suffixes[0])}")


def _link_refused(path: Path, kind: OwnedFile) -> LPError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    if _is_stream(path, target):  # /dev/stdout -> /proc/self/fd/1: a terminal, a pipe, or the file it redirects to
        return LPError(f"output {path} is a stream (a link to {target}), not a file: lpconvert writes a new file "
                       "and renames it into place", kind.stream_fix)
    if _real(path).is_file():
        return LPError(f"output {path} is a symbolic link (to {target}); lpconvert never writes through a link, "
                       "which would replace the file it points at", "give a new file name, or remove the link")
    return LPError(f"output {path} is a symbolic link to {target}, not a file: lpconvert writes a new file and "
                   "renames it into place", "give a new file name, or remove the link")


def _is_stream(path: Path, target: str) -> bool:
    return any(str(p).startswith(("/dev/", "/proc/")) for p in (Path(os.path.abspath(path)), Path(target)))


def _check_identity(path: Path, protect: list[Path], inputs: Iterable[Path]) -> None:
    """An existing output that is, by device and inode, a file of the source or one the command reads."""
    info = os.stat(path)
    key = (info.st_dev, info.st_ino)
    hit = file_identities(protect).get(key)
    if hit is not None:
        if _same_name(path, hit):
            raise LPError(f"output {path} is a file of the source model ({hit})",
                          "write it outside the model folder, or under a new name")
        raise LPError(f"output {path} is a hard link to {hit}, a file of the source model, which writing it "
                      "would change", "write the output under a new name")
    hit = file_identities([Path(p) for p in inputs]).get(key)
    if hit is not None:
        link = "" if _same_name(path, hit) else f" (a hard link to {hit})"
        raise LPError(f"output {path} is a file this command reads{link}", "write the result under a new name")


def _same_name(path: Path, other: Path) -> bool:
    return _real(path) == _real(other)


MAX_PROTECTED_FILES = 100_000  # entries of a source folder walked to compare files by identity (a model has dozens)


def file_identities(paths: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> path of every regular file among `paths` and under those that are folders
    (links followed, as the Hugging Face cache's snapshot links to its blobs)."""
    found: dict[tuple[int, int], Path] = {}
    for root in paths:
        try:
            info = os.stat(root)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(info.st_mode):
            found.setdefault((info.st_dev, info.st_ino), Path(root))
        elif stat.S_ISDIR(info.st_mode):
            seen = 0
            for folder, subfolders, names in os.walk(root):
                seen += len(subfolders) + len(names)
                for name in names:
                    file = Path(folder) / name
                    try:
                        info = os.stat(file)
                    except OSError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        found.setdefault((info.st_dev, info.st_ino), file)
                if seen > MAX_PROTECTED_FILES:  # not a model's folder: its first files are compared, no more
                    break
    return found


def _check_replaceable(path: Path, kind: OwnedFile, overwrite: bool) -> None:
    if not path.exists():
        return
    if not overwrite:
        raise LPError(f"{kind.what} {path} already exists", "pass --overwrite or choose another path")
    if not kind.written(path):
        raise LPError(f"{kind.what} {path} was not written by lpconvert, so --overwrite will not replace it",
                      "choose a new output path, or remove the file yourself")


# What makes a folder a model's: lpconvert's outputs never go into one, nor into any folder under one
# (a source reader takes every *.safetensors of a folder without an index as part of the model, and
# a subfolder of a model repo is a variant of it). A config.json counts unless it is plainly another
# program's (a JSON object with none of a model config's keys).
MODEL_FILES = re.compile(
    r"(?P<weights>model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors|"
    r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?)|"
    r"(?P<peft>adapter_config\.json|adapter_model\.(safetensors|bin))|(?P<meta>consolidated\.\d+\.pth)")
MODEL_CONFIG_KEYS = ("model_type", "architectures", MARKER_KEY, "auto_map", "_name_or_path")
WORDS = {"weights": "model weights", "peft": "a PEFT adapter", "meta": "a Meta checkpoint", "gguf": "a GGUF model"}


def model_folder_of(path: Path, gguf: bool = True) -> tuple[Path, str] | None:
    """The model folder `path` would be written into, and what makes it one, in words: the folder
    itself or any folder above it. A folder holding a GGUF counts only as the folder itself, and only
    when `gguf` (GGUFs sit side by side, one file each)."""
    folder = _real(Path(path).parent)
    evidence = _model_in(folder, gguf)
    if evidence:
        return folder, evidence
    for above in folder.parents:
        evidence = _model_in(above, gguf=False)
        if evidence:
            return above, evidence
    return None


def _model_in(folder: Path, gguf: bool) -> str | None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        name = entry.name
        if name == "config.json":
            if _model_config(Path(entry.path)):
                return "it holds a model's config.json"
            continue
        found = MODEL_FILES.fullmatch(name)
        if found:
            return f"it holds {WORDS[found.lastgroup]}, {name}"
        if gguf and name.lower().endswith(".gguf"):
            return f"it holds {WORDS['gguf']}, {name}"
    return None


def _model_config(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_OWNED_JSON_BYTES:
            return True
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return path.exists()  # unreadable: it may well be a model's
    return not isinstance(data, dict) or any(key in data for key in MODEL_CONFIG_KEYS)


@contextlib.contextmanager
def atomic_output_file(path: Path, kind: OwnedFile | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it to `path` only if the block succeeds.

    The rename replaces whatever is at `path` itself (a link included), never what a link points at. With
    `kind`, what is at `path` now is checked once more just before (the command ran for minutes)."""
    path = Path(path)
    tmp = None
    try:
        # a fresh name in the path's own folder (links above followed, a link at the path not): two runs
        # never share a temporary file, and the rename never crosses a device
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_real(path.parent))
        os.close(fd)
        tmp = Path(name)
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # what open() would have made, not mkstemp's 0600
        if kind is not None:
            _recheck(path, kind, overwrite)
        tmp.replace(path)
    except OSError as exc:
        _remove(tmp)
        raise _os_problem(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _recheck(path: Path, kind: OwnedFile, overwrite: bool) -> None:
    """What is at an output path just before it is replaced: a link, a folder or a file lpconvert did not
    write that appeared meanwhile is left alone."""
    if path.is_symlink():
        raise _link_refused(path, kind)
    if path.exists() and not path.is_file():
        raise LPError(f"output {path} is no longer a regular file", "write to a new file")
    _check_replaceable(path, kind, overwrite)


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text_atomically(path: Path, text: str, kind: OwnedFile | None = None, overwrite: bool = False) -> None:
    with atomic_output_file(path, kind, overwrite) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: Path, data: dict, kind: OwnedFile | None = None, overwrite: bool = False) -> None:
    write_text_atomically(path, strict_json(data) + "\n", kind, overwrite)


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
