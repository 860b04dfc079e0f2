"""Calibration and evaluation texts: where they come from and how they become token windows.

`resolve_text(source)` turns one user-supplied string into a `TextSource`:

* ``wiki`` / ``news``: built-in English samples shipped as test data inside the gensim package
  (a shortened Wikipedia XML dump, cleaned to prose here, and 300 Lee news articles);
* an existing ``.txt`` (or any plain-text) file, a ``.jsonl`` / ``.json`` file, or a folder of them;
* otherwise a Hugging Face dataset name (``wikitext``, ``user/name``, ``name:config``).

`make_windows` cuts a token stream into consecutive, non-overlapping windows of ``seq_len`` tokens
and splits them **by position**: window ``i`` is held out when ``i % heldout_every ==
heldout_every - 1`` (every 10th window by default). Because the rule ignores the seed and the token
budget, calibration windows drawn with any seed and any budget never overlap the held-out windows
used for evaluation. Calibration windows are the remaining ones, shuffled by the seed; a smaller
budget with the same seed is a prefix of a larger one. A stream with fewer than ``heldout_every``
windows has no held-out split (calibration then uses every window).

Nothing is read without limit: files, folders and datasets stop at a byte cap (`max_bytes`, by
default `DEFAULT_MAX_BYTES`; `bytes_for_tokens` sizes one generously from a token budget), so a
huge file, a FIFO or ``/dev/zero`` can't exhaust memory. A cut text ends at a line boundary and
records where (`TextSource.truncated_at_bytes`, copied into the windows' provenance). A cut text
is a prefix of the full one, so its window positions, and the held-out rule, are the same.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lpconvert.errors import LPError

GENSIM_FIX = "run `make install` or `pip install --no-deps gensim==4.4.0` (it ships the built-in texts)"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "test/test_data/lee_background.cor"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
SPLITS = ("calib", "heldout", "all")
# `wikitext`, `user/name`, optionally `:config`; anything else that isn't a path is "missing path".
DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
HELDOUT_EVERY = 10  # window i is held out when i % 10 == 9
# Byte caps. Real text averages about 4 bytes per token; 64 leaves room for code, CJK and markup.
DEFAULT_MAX_BYTES = 256 << 20  # when no cap is given: nothing anywhere reads without limit
MIN_MAX_BYTES = 64 << 20  # the smallest cap bytes_for_tokens gives, however small the budget
BYTES_PER_TOKEN = 64
READ_CHUNK = 1 << 20  # NUL bytes in the first chunk refuse /dev/zero before more is read


@dataclass(frozen=True)
class TextSource:
    name: str  # "wiki", "news", the path as given, or the dataset name
    kind: str  # "builtin", "file", "folder" or "dataset"
    text: str = field(repr=False)
    truncated_at_bytes: int | None = None  # input bytes kept when the byte cap cut the text, else None

    @functools.cached_property  # works on frozen dataclasses: it writes __dict__ directly
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class Windows:
    input_ids: torch.Tensor  # LongTensor (n, seq_len)
    provenance: dict


# ---------------------------------------------------------------------------------------------
# Resolving a source
# ---------------------------------------------------------------------------------------------


def bytes_for_tokens(num_tokens: int | None, seq_len: int) -> int:
    """A generous byte cap for a text that must yield `num_tokens` tokens of any split.

    The held-out split takes 1 window in HELDOUT_EVERY, so it needs that many times the budget; a
    budget rounds up to whole windows, so at most one more window. No budget: DEFAULT_MAX_BYTES.
    """
    if num_tokens is None:
        return DEFAULT_MAX_BYTES
    tokens = max(num_tokens, 0) + max(seq_len, 0)
    return max(MIN_MAX_BYTES, tokens * HELDOUT_EVERY * BYTES_PER_TOKEN)


@dataclass
class _Budget:
    """The bytes a text source may still read; the files of a folder share one."""

    left: int
    used: int = 0
    cut: bool = False

    def take(self, n: int, cut: bool = False) -> None:
        self.left -= n
        self.used += n
        self.cut = self.cut or cut


def resolve_text(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    column: str | None = None,
    max_bytes: int | None = None,
) -> TextSource:
    """Load the text named by `source` (built-in, path or dataset name); see the module docstring.

    Reads at most `max_bytes` bytes (DEFAULT_MAX_BYTES when None) of a file, folder or dataset."""
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    cap = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    budget = _Budget(cap)
    if source in BUILTINS:
        kind, text = "builtin", BUILTINS[source]()  # a few MB, shipped and fixed: never cut
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if path.is_dir():
            kind, text = "folder", _read_folder(path, text_field, budget)
        else:
            kind, text = "file", _read_file(path, text_field, budget)
    elif DATASET_NAME.match(source) and not source.lower().endswith(TEXT_SUFFIXES):
        kind, text = "dataset", _load_dataset(source, split, column or text_field, budget)
    else:
        raise LPError(
            f"text source {source} does not exist", "check the path, or use the built-ins wiki / news"
        )
    if not text.strip() and budget.cut:  # one line or record longer than the whole cap
        raise LPError(
            f"text source {source} has no complete line or record in the first {_size(cap)} it may read",
            "split the text into shorter lines or records",
        )
    if not text.strip():
        raise LPError(f"text source {source} is empty", "use a file or dataset that contains text")
    return TextSource(source, kind, text, budget.used if budget.cut else None)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _gensim_data(relative: str) -> Path:
    # find_spec on a top-level package locates it without executing its (heavy) __init__.
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LPError("the built-in texts need the gensim package, which is not installed", GENSIM_FIX)
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise LPError(f"gensim is installed but lacks {relative}", GENSIM_FIX)
    return path


@functools.lru_cache(maxsize=1)
def _news_text() -> str:
    lines = _gensim_data(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


@functools.lru_cache(maxsize=1)
def _wiki_text() -> str:
    articles = (clean_wikitext(text) for text in _wiki_articles(_gensim_data(WIKI_FILE)))
    return "\n\n".join(a for a in articles if a)


BUILTINS = {"wiki": _wiki_text, "news": _news_text}


def _wiki_articles(path: Path):
    """Yield the raw wikitext of each main-namespace, non-redirect page of a MediaWiki dump."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            text = fields["text"].text if "text" in fields else None
            is_article = fields.get("ns") is not None and fields["ns"].text == "0"
            is_redirect = "redirect" in fields or (text or "").lstrip().upper().startswith("#REDIRECT")
            if text and is_article and not is_redirect:
                yield text
            elem.clear()  # keep memory flat while streaming the dump


# --- wiki markup ----------------------------------------------------------------------------

# Sections after which an article is only lists of links and citations.
_TAIL_SECTIONS = re.compile(
    r"^==+\s*(see also|references|notes|footnotes|further reading|external links|bibliography|sources)"
    r"\s*==+\s*$",
    re.I | re.M,
)
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
# Tags whose content is not prose (citations, formulas, galleries, code...).
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|chem|hiero|source|syntaxhighlight|code|references)"
    r"\b[^>]*?(/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first; repeated until none left
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost first as well
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
# File/Image/Category links, and interlanguage links like [[de:Anarchismus]] (lower-case code).
_DROP_LINK = re.compile(r"^\s*((?i:file|image|category|media)|[a-z]{2,3}(-[a-z]+)?)\s*:")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _repeat_sub(pattern: re.Pattern, repl, text: str) -> str:
    """Apply `pattern` until nothing changes: strips nested constructs from the inside out."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    if _DROP_LINK.match(target) and not target.lstrip().startswith(":"):
        return ""  # files, images, categories and interlanguage links
    return target.rsplit("|", 1)[-1].strip() if "|" in target else target.lstrip(":").strip()


def clean_wikitext(text: str) -> str:
    """Reduce one article's wikitext to plain prose (good enough for calibration, not a parser)."""
    tail = _TAIL_SECTIONS.search(text)
    text = text[: tail.start()] if tail else text
    text = _COMMENT.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _repeat_sub(_TEMPLATE, "", text)
    text = re.sub(r"\{\{[^\n]*|\}\}", "", text)  # unbalanced leftovers: drop to the end of the line
    text = _repeat_sub(_TABLE, "", text)
    text = _repeat_sub(_LINK, _link_text, text)  # captions' inner links go before their File: link
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and friends
    text = _HEADING.sub(r"\2", text)
    text = html.unescape(_TAG.sub("", text))  # unescape last so &lt;..&gt; never becomes a tag
    return _tidy_lines(text)


def _tidy_lines(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where a template was removed
        line = re.sub(r" +([,.;:])", r"\1", line).strip()
        if line.startswith(("*", "#", ":", ";")):
            line = line.lstrip("*#:; ")
            if len(line.split()) < 4:  # bullets reduced to nothing but a word or two
                continue
        if line.startswith(("|", "!", "{", "}", "[", "]")) or line == "-":
            continue  # table rows and leftovers of unbalanced templates or links
        lines.append(line)  # an empty line keeps its paragraph break
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- local files ----------------------------------------------------------------------------


def _read_capped(path: Path, limit: int) -> tuple[bytearray, bool]:
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


def _read_plain(path: Path, budget: _Budget, *, whole_lines: bool = False) -> str:
    """Read `path` within `budget`; a cut read ends after its last whole line (`whole_lines`: always)."""
    data, cut = _read_capped(path, budget.left)
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


def _read_jsonl(path: Path, text_field: str, budget: _Budget) -> str:
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


def _read_json(path: Path, text_field: str, budget: _Budget) -> str:
    # One document can't be cut: above the cap refuse it, by its size when it has one (a FIFO doesn't).
    size = path.stat().st_size if path.is_file() else None
    too_big = size is not None and size > budget.left
    part = _Budget(budget.left)
    text = "" if too_big else _read_plain(path, part)
    if too_big or part.cut:
        what = f"{_size(size)}, more than" if too_big else "more than"
        raise LPError(
            f"{path} is one JSON document of {what} the {_size(budget.left)} a text source may read",
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


def _read_file(path: Path, text_field: str, budget: _Budget) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field, budget)
    if suffix == ".json":
        return _read_json(path, text_field, budget)
    return _read_plain(path, budget)  # .txt, and any other extension that holds plain text


def _read_folder(folder: Path, text_field: str, budget: _Budget) -> str:
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
        text = _read_file(path, text_field, budget).strip()
        if text:
            texts.append(text)
    return "\n\n".join(texts)


# --- Hugging Face datasets ------------------------------------------------------------------


def _load_dataset(source: str, split: str, column: str, budget: _Budget) -> str:
    name, _, config = source.partition(":")
    try:
        import datasets  # lazy: heavy, and only this path needs it
        from huggingface_hub.utils import logging as hub_logging

        # Their network warnings would print beside our one-line error; the error says it all.
        hub_logging.set_verbosity_error()
        if hasattr(datasets, "logging"):
            datasets.logging.set_verbosity_error()
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
            "name the text column with --column",
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


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def _count(num_tokens: int | None, seq_len: int) -> int | None:
    return None if num_tokens is None else -(-num_tokens // seq_len)  # ceil division


def make_windows(
    token_ids: list[int] | torch.Tensor,
    *,
    seq_len: int,
    num_tokens: int | None,
    seed: int,
    split: str = "calib",
    heldout_every: int = HELDOUT_EVERY,
    label: str = "the text",
) -> torch.Tensor:
    """Cut `token_ids` into (n, seq_len) windows of the given split; `label` names the text in errors."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if seq_len < 2:
        raise LPError(f"--seq-len must be at least 2, got {seq_len}", "use e.g. --seq-len 512")
    if num_tokens is not None and num_tokens <= 0:
        raise LPError(f"the token budget must be positive, got {num_tokens}", "use e.g. --tokens 16384")
    if num_tokens is not None and num_tokens < seq_len:  # it would silently grow to one whole window
        raise LPError(
            f"the token budget ({num_tokens}) is smaller than one window of {seq_len} tokens (--seq-len)",
            f"use --tokens {seq_len} or more, or a smaller --seq-len",
        )
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be at least 2, got {heldout_every}")

    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        smaller = 1 << max(1, ids.numel().bit_length() - 1)  # largest power of two that fits
        fix = f"use a longer text or --seq-len {smaller}" if ids.numel() >= 2 else "use a longer text"
        raise LPError(f"{label} has {ids.numel()} tokens, fewer than one window of {seq_len}", fix)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)

    position = torch.arange(n_windows)
    has_heldout = n_windows >= heldout_every
    heldout = (position % heldout_every == heldout_every - 1) & has_heldout
    count = _count(num_tokens, seq_len)
    if split == "all":
        chosen = position[:count]
    elif split == "heldout":
        if not has_heldout:
            raise LPError(
                f"{label} has only {n_windows} windows of {seq_len} tokens, too few for a held-out "
                f"split (1 in {heldout_every})",
                "use a longer text, a smaller --seq-len, or evaluate on a separate text",
            )
        chosen = position[heldout][:count]
    else:
        calib = position[~heldout]
        order = torch.randperm(calib.numel(), generator=torch.Generator().manual_seed(seed))
        chosen = calib[order][:count]
    return windows[chosen]  # advanced indexing copies: the result doesn't pin the whole stream


def _tokenize(tokenizer, text: str) -> list[int]:
    # verbose=False silences "sequence longer than the model's max length": we cut it ourselves.
    try:
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # a tokenizer-like callable without `verbose`
        encoded = tokenizer(text, add_special_tokens=False)
    return list(encoded["input_ids"])


def tokenize_windows(
    tokenizer, source: TextSource, *, seq_len: int, num_tokens: int | None, seed: int, split: str = "calib"
) -> Windows:
    """Tokenise the whole text once (no BOS/EOS) and cut it into windows of `split`."""
    ids = _tokenize(tokenizer, source.text)
    heldout_every = HELDOUT_EVERY
    input_ids = make_windows(
        ids,
        seq_len=seq_len,
        num_tokens=num_tokens,
        seed=seed,
        split=split,
        heldout_every=heldout_every,
        label=f"text source {source.name}",
    )
    n = input_ids.shape[0]
    provenance = {
        "source": source.name,
        "kind": source.kind,
        "sha256": source.sha256,
        "split": split,
        "seq_len": seq_len,
        "seed": seed,
        "windows": n,
        "tokens": n * seq_len,
        "text_tokens": len(ids),
        "heldout_every": heldout_every,
        "truncated_at_bytes": source.truncated_at_bytes,  # None: the whole text was read
    }
    return Windows(input_ids=input_ids, provenance=provenance)
