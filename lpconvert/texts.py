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

The reading itself is in lpconvert.textread; the built-in ``wiki`` text is cleaned by lpconvert.wikitext.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lpconvert.errors import LPError
from lpconvert.settings import TEXT_SPLITS
from lpconvert.textread import (
    READ_CHUNK,
    TEXT_SUFFIXES,
    Budget,
    load_dataset,
    read_capped,
    read_file,
    read_folder,
    size_text,
)
from lpconvert.wikitext import clean_wikitext, wiki_articles

GENSIM_FIX = "run `make install` or `pip install --no-deps gensim==4.4.0` (it ships the built-in texts)"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "test/test_data/lee_background.cor"
SPLITS = TEXT_SPLITS
# `wikitext`, `user/name`, optionally `:config`; anything else that isn't a path is "missing path".
DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
HELDOUT_EVERY = 10  # window i is held out when i % 10 == 9
# Byte caps. Real text averages about 4 bytes per token; 64 leaves room for code, CJK and markup.
DEFAULT_MAX_BYTES = 256 << 20  # when no cap is given: nothing anywhere reads without limit
MIN_MAX_BYTES = 64 << 20  # the smallest cap bytes_for_tokens gives, however small the budget
BYTES_PER_TOKEN = 64


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
    budget = Budget(cap)
    if source in BUILTINS:
        kind, text = "builtin", BUILTINS[source]()  # a few MB, shipped and fixed: never cut
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if path.is_dir():
            kind, text = "folder", read_folder(path, text_field, budget)
        else:
            kind, text = "file", read_file(path, text_field, budget)
    elif DATASET_NAME.match(source) and not source.lower().endswith(TEXT_SUFFIXES):
        kind, text = "dataset", load_dataset(source, split, column or text_field, budget)
    else:
        raise LPError(
            f"text source {source} does not exist", "check the path, or use the built-ins wiki / news"
        )
    if not text.strip() and budget.cut:  # one line or record longer than the whole cap
        raise LPError(
            f"text source {source} has no complete line or record in the first {size_text(cap)} it may read",
            "split the text into shorter lines or records",
        )
    if not text.strip():
        raise LPError(f"text source {source} is empty", "use a file or dataset that contains text")
    return TextSource(source, kind, text, budget.used if budget.cut else None)


def check_text_name(source: str, label: str) -> None:
    """Refuse, without reading it, a text source resolve_text would not find: a stage that reads its text
    late (eval after the export) must not learn of a typo after hours of work."""
    path = Path(source).expanduser()
    if source in BUILTINS or path.is_dir():
        return
    if path.exists():
        _check_looks_like_text(path, label)
        return
    if DATASET_NAME.match(source) and not source.lower().endswith(TEXT_SUFFIXES):
        return  # a dataset name: whether it loads offline is known only by loading it
    raise LPError(f"{label}: text source {source} does not exist", "check the path, or use the built-ins wiki / news")


def _check_looks_like_text(path: Path, label: str) -> None:
    """A device can't be a text; a regular file is peeked at for the NUL bytes of a binary. A FIFO is left to
    the stage: peeking would take the bytes the stage is to read."""
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise LPError(f"{label}: text source {path} is a device, not a text file", "give a UTF-8 text file")
    if stat.S_ISREG(mode):
        try:
            read_capped(path, READ_CHUNK)  # the first chunk: a binary shows its NUL bytes there
        except LPError as exc:
            raise LPError(f"{label}: {exc.problem}", exc.fix) from None


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
    articles = (clean_wikitext(text) for text in wiki_articles(_gensim_data(WIKI_FILE)))
    return "\n\n".join(a for a in articles if a)


BUILTINS = {"wiki": _wiki_text, "news": _news_text}


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
