"""The tokenizer inside a GGUF: llama.cpp tokenizes with what the file carries, never with tokenizer.json.

Two sources:

- a GGUF source: its `tokenizer.*` keys are copied as they are (llama.cpp read them already);
- a Hugging Face folder with a byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen2, SmolLM): the
  tokens in id order, their types, the merges, the special token ids, the chat template, and the name
  of the pre-tokenizer, which llama.cpp knows by name only. The name comes from PRE_TOKENIZERS, a
  table of tokenizer.json's pre_tokenizer, written out step by step; a pre-tokenizer not in the table
  is refused, since llama.cpp would then split text differently from transformers without a word.

SentencePiece tokenizers (Llama 2, Mistral) are refused for now: llama.cpp scores their merges with
the SentencePiece model's scores, which tokenizer.json does not carry.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import LPError

# llama.cpp's tokenizer regexes (src/llama-vocab.cpp), as tokenizer.json writes the same splits.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.json's pre_tokenizer, step by step (`_steps`) -> llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel+regex",): "gpt-2",  # GPT-2's own split (and the built-in SmolLM2 folder's)
    ("Digits:individual", "ByteLevel+regex"): "smollm",
    (f"Split:{_LLAMA3_SPLIT}", "ByteLevel"): "llama-bpe",
    (f"Split:{_QWEN2_SPLIT}", "ByteLevel"): "qwen2",
    ("normalizer NFC", f"Split:{_QWEN2_SPLIT}", "ByteLevel"): "qwen2",  # Qwen2's own (llama.cpp skips NFC)
}

# GGUF token types (gguf.TokenType), by value: the module is imported only when a file is written.
NORMAL, USER_DEFINED, CONTROL, UNUSED = 1, 4, 3, 5


def _steps(pre: dict | None) -> tuple[str, ...]:
    """A pre_tokenizer as a tuple of comparable steps ("Split:<regex>", "ByteLevel+regex", ...)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", []) for step in _steps(p))
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return ("ByteLevel+prefix_space",)
        return ("ByteLevel+regex",) if pre.get("use_regex", True) else ("ByteLevel",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        behavior = pre.get("behavior")
        regex = pattern.get("Regex", pattern.get("String"))
        return (f"Split:{regex}",) if behavior == "Isolated" and not pre.get("invert") else (f"Split?:{regex}",)
    if kind == "Digits":
        return ("Digits:individual",) if pre.get("individual_digits") else ("Digits",)
    return (str(kind),)


def pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer, or LPError."""
    steps = _steps(tokenizer.get("pre_tokenizer"))
    if tokenizer.get("normalizer"):
        steps = (f"normalizer {tokenizer['normalizer'].get('type')}", *steps)
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        shown = " + ".join(s.split(":")[0] for s in steps) or "none"
        raise LPError(f"the tokenizer's pre-tokenizer ({shown}) is not one lpconvert can name for llama.cpp "
                      "(GPT-2, Llama 3, Qwen2, SmolLM)",
                      "export the GGUF from a GGUF of the source model (lpconvert reads .gguf), or the safetensors format")
    return name


def bpe_vocabulary(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts in id order and their GGUF types; ids the tokenizer leaves empty are [PADn] (unused)."""
    texts: dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    kinds: dict[int, int] = dict.fromkeys(texts, NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        texts[added["id"]] = added["content"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    largest = max(texts) + 1
    if largest > vocab_size:
        raise LPError(f"the tokenizer has token ids up to {largest - 1}, the model's embeddings {vocab_size} rows",
                      "use the tokenizer that came with the model")
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, UNUSED) for i in range(vocab_size)]
    return tokens, types


def _read_tokenizer_json(folder: Path | None, name: str) -> dict:
    path = Path(folder) / "tokenizer.json" if folder else None
    if path is None or not path.is_file():
        raise LPError(f"{name} has no tokenizer.json, and a GGUF must carry its tokenizer",
                      "export from a model folder with its tokenizer, or from a GGUF of it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LPError(f"cannot read {path}: {exc}", "re-download the tokenizer") from None


def check_vocabulary(source) -> dict | None:
    """Refuse, before anything is written, a tokenizer the GGUF cannot carry; returns the tokenizer.json
    that write_vocabulary writes (None for a GGUF source, whose keys are copied)."""
    if getattr(source, "gguf_file", None):
        return None
    tokenizer = _read_tokenizer_json(source.tokenizer_path, source.name)
    model = tokenizer.get("model") or {}
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        kind = ("SentencePiece-style (BPE with byte fallback)" if model.get("byte_fallback")
                else f"{model.get('type')} without byte-level decoding")
        raise LPError(f"the tokenizer is {kind}; lpconvert writes byte-level BPE tokenizers into a GGUF "
                      "(GPT-2, Llama 3, Qwen2, SmolLM)",
                      "export the GGUF from a GGUF of the source model (lpconvert reads .gguf), or the safetensors format")
    pre_tokenizer_name(tokenizer)
    bpe_vocabulary(tokenizer, source.config.vocab_size)
    return tokenizer


def copy_gguf_vocabulary(writer, path: Path) -> None:
    """Every tokenizer.* key of an existing GGUF, unchanged."""
    from gguf import GGUFReader

    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            types = field.types
            writer.add_key_value(key, field.contents(), types[0], sub_type=types[1] if len(types) > 1 else None)


def write_vocabulary(writer, source, vocab_size: int, tokenizer: dict | None) -> None:
    """The source's tokenizer into the GGUF being written: `tokenizer` is what check_vocabulary returned."""
    import gguf

    if tokenizer is None:
        copy_gguf_vocabulary(writer, Path(source.path) / source.gguf_file)
        return
    tokens, types = bpe_vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its info lines would break the progress bar
    special = gguf.SpecialVocab(Path(source.tokenizer_path), load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
