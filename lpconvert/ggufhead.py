"""The first metadata entries of a GGUF file, read without gguf-py.

gguf-py's GGUFReader parses every entry, the tokenizer's token and merge lists included: 2.5 s for
SmolLM2's 49k tokens. Whether a file is an lpconvert export, and its provenance and sizes, sit in the
entries before the tokenizer (ggufexport writes general.architecture, general.name, lpconvert.*, then
the deci hyperparameters, then the tokenizer), so reading stops at the first array of strings.
"""

from __future__ import annotations

import struct
from pathlib import Path

# GGUF value types (gguf.GGUFValueType) -> struct format of one value; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        length = self.unpack("Q")
        if length > 1 << 20:
            raise ValueError("a metadata string longer than 1 MB")
        return self.f.read(length).decode("utf-8")


def read_gguf_head(path: Path) -> dict:
    """Metadata key -> value for the entries before the first array of strings (ValueError if the file
    is not a GGUF of version 2 or later; OSError if it can't be read)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        r = _Reader(f)
        if r.unpack("I") < 2:
            raise ValueError("GGUF version 1 is not read")
        r.unpack("Q")  # tensor count
        entries = r.unpack("Q")
        head: dict = {}
        for _ in range(entries):
            key, kind = r.string(), r.unpack("I")
            if kind == _STRING:
                head[key] = r.string()
            elif kind == _ARRAY:
                item, count = r.unpack("I"), r.unpack("Q")
                if item not in _SCALARS or count > 1 << 16:
                    break  # strings or a long list (the tokenizer): everything read here comes before them
                head[key] = [r.unpack(_SCALARS[item]) for _ in range(count)]
            elif kind in _SCALARS:
                head[key] = r.unpack(_SCALARS[kind])
            else:
                raise ValueError(f"unknown GGUF value type {kind}")
    return head
