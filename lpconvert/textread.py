"""Bounded reads of text: files, folders of them and Hugging Face datasets, within one byte budget.

`lpconvert.texts.resolve_text` gives each source a `Budget` of bytes; everything read here takes
from it, and nothing reads past it (the files of a folder share one):

* a plain-text file (``.txt`` or any other extension) is read in chunks up to the budget, so a
  FIFO or ``/dev/zero`` can't exhaust memory (NUL bytes refuse it on the first chunk); a cut read
  ends after its last whole line, or with no line break at its last whole UTF-8 character;
* a ``.jsonl`` file is cut after its last whole record;
* a ``.json`` file is one document and can't be cut: above the budget it is refused;
* a folder reads its ``.txt`` / ``.jsonl`` / ``.json`` files in path order (hidden ones skipped)
  until the budget runs out;
* a dataset keeps whole rows of its text column while they fit.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from lpconvert.errors import LPError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
READ_CHUNK = 1 << 20  # NUL bytes in the first chunk refuse /dev/zero before more is read


@dataclass
class Budget:
    """The bytes a text source may still read; the files of a folder share one."""

    left: int
    used: int = 0
    cut: bool = False

    def take(self, n: int, cut: bool = False) -> None:
        self.left -= n
        self.used += n
        self.cut = self.cut or cut



def size_text(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# --- local files ----------------------------------------------------------------------------


def read_capped(path: Path, limit: int) -> tuple[bytearray, bool]:
    """Up to `limit` bytes of `path` (a file, FIFO or device) and whether there was more."""
    data = bytearray()
    with open(path, "rb") as f:
        while len(data) <= limit:  # one byte past the limit tells "exactly the limit" from "more"
            chunk = f.read(min(READ_CHUNK, limit + 1 - len(data)))
            if not chunk:
                break
            if b"\x00" in chunk:  # checked per chunk: /dev/zero fails on its first read
                raise LPError(
                    f"{path} looks like a binary file (it contains NUL bytes)", "give a UTF-8 text file"
                )
            data += chunk
    cut = len(data) > limit
    del data[limit:]
    return data, cut


def _whole_chars(data: bytearray) -> int:
    """The length of `data` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or a lead byte: is its character complete?
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if need > back else len(data)
    return len(data)  # no lead byte: invalid UTF-8 anyway, and the decoder says where


def _read_plain(path: Path, budget: Budget, *, whole_lines: bool = False) -> str:
    """Read `path` within `budget`; a cut read ends after its last whole line (`whole_lines`: always)."""
    data, cut = read_capped(path, budget.left)
    if cut:  # end after the last whole line; with none, plain text ends at a whole character
        end = data.rfind(b"\n") + 1
        del data[end if end or whole_lines else _whole_chars(data) :]
    budget.take(len(data), cut)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LPError(f"{path} is not valid UTF-8 text (byte {e.start})", "give a UTF-8 text file") from None


def _field(record, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    raise LPError(
        f"{where} has no string field '{text_field}' (found: {keys})",
        "name the field holding the text with --text-field",
    )


def _read_jsonl(path: Path, text_field: str, budget: Budget) -> str:
    texts = []
    for number, line in enumerate(_read_plain(path, budget, whole_lines=True).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LPError(
                f"line {number} of {path} is not valid JSON ({e.msg})", "fix or remove that line"
            ) from None
        texts.append(_field(record, text_field, f"line {number} of {path}"))
    return "\n\n".join(texts)


def _read_json(path: Path, text_field: str, budget: Budget) -> str:
    # One document can't be cut: above the cap refuse it, by its size when it has one (a FIFO doesn't).
    size = path.stat().st_size if path.is_file() else None
    too_big = size is not None and size > budget.left
    part = Budget(budget.left)
    text = "" if too_big else _read_plain(path, part)
    if too_big or part.cut:
        what = f"{size_text(size)}, more than" if too_big else "more than"
        raise LPError(
            f"{path} is one JSON document of {what} the {size_text(budget.left)} a text source may read",
            "use .jsonl (one record per line, read only as far as needed) or a smaller file",
        )
    budget.take(part.used)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LPError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})", "fix the file") from None
    if isinstance(data, dict):  # {"data": [...]}: use the one list inside (or the one named "data")
        lists = [key for key, value in data.items() if isinstance(value, list)]
        key = lists[0] if len(lists) == 1 else "data" if "data" in lists else None
        data = data[key] if key else None
    if not isinstance(data, list):
        raise LPError(
            f"{path} holds no list of records",
            "use a JSON list of objects or strings, or an object with one such list",
        )
    return "\n\n".join(_field(r, text_field, f"record {i} of {path}") for i, r in enumerate(data))


def read_file(path: Path, text_field: str, budget: Budget) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field, budget)
    if suffix == ".json":
        return _read_json(path, text_field, budget)
    return _read_plain(path, budget)  # .txt, and any other extension that holds plain text


def read_folder(folder: Path, text_field: str, budget: Budget) -> str:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not files:
        raise LPError(
            f"folder {folder} has no .txt, .jsonl or .json files", "point at a folder of text files"
        )
    texts = []
    for path in files:
        if path.suffix.lower() == ".json" and texts and path.stat().st_size > budget.left:
            budget.cut = True  # a JSON document can't be cut: the folder's text ends before it
        if budget.cut:
            break
        text = read_file(path, text_field, budget).strip()
        if text:
            texts.append(text)
    return "\n\n".join(texts)


# --- Hugging Face datasets ------------------------------------------------------------------


@contextlib.contextmanager
def _offline_as_the_environment_says(datasets):
    """HF_HUB_OFFLINE as set now: datasets and huggingface_hub read it once, when first imported, so a
    later setting would otherwise send requests that retry for about 20 s before failing."""
    from huggingface_hub import constants

    from .hub import hub_offline

    if not hub_offline():
        yield
        return
    config = getattr(datasets, "config", None)
    saved = constants.HF_HUB_OFFLINE, getattr(config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    if saved[1] is not None:
        config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is not None:
            config.HF_HUB_OFFLINE = saved[1]


def load_dataset(source: str, split: str, column: str, budget: Budget) -> str:
    name, _, config = source.partition(":")
    try:
        import datasets  # lazy: heavy, and only this path needs it
        from huggingface_hub.utils import logging as hub_logging

        # Their network warnings would print beside our one-line error; the error says it all.
        hub_logging.set_verbosity_error()
        if hasattr(datasets, "logging"):
            datasets.logging.set_verbosity_error()
        with _offline_as_the_environment_says(datasets):
            rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, not found, bad config or split: all the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LPError(
            f"dataset {source} is not a local path and could not be loaded ({reason})",
            "use a local .txt/.jsonl file, or the built-in texts wiki / news",
        ) from None
    if column not in rows.column_names:
        raise LPError(
            f"dataset {source} has no column '{column}' (columns: {', '.join(rows.column_names)})",
            "name the text column with --text-field",
        )
    texts = []
    for value in rows[column]:
        if not isinstance(value, str):
            continue
        size = len(value.encode("utf-8")) + 1  # and its newline
        if size > budget.left:  # whole rows only, like whole lines of a file
            budget.cut = True
            break
        budget.take(size)
        texts.append(value)
    return "\n".join(texts)
