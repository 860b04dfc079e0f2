"""Where and in what precision the stages run a model, and the setup they share.

score, plan and eval each read a text, cut it into token windows and load the model on a device
in a dtype; they do it through these few functions, so a device name, a dtype name or a text
budget means the same thing everywhere.
"""

from __future__ import annotations

import math

import torch

from . import settings
from .errors import LPError
from .settings import COMPUTE_DTYPES  # noqa: F401  (re-exported: the names are settings.py's)

# The dtypes a user may ask for by name (--dtype). Measuring (plan) may also say "auto" (COMPUTE_DTYPES):
# float32 on the CPU, where 16-bit matmuls are slow, else bfloat16.
DTYPES = {name: getattr(torch, name) for name in settings.DTYPES}


def perplexity(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood; inf where math.exp would raise OverflowError (a broken model)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def resolve_device(name: str, label: str = "--device") -> str:
    """auto -> cuda when there is a GPU, else cpu; a named device must exist. `label` names the setting as the
    user wrote it (--device, or recipe key eval.device)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise LPError(f"{label} '{name}' does not exist", "use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LPError(f"{label} {name} was asked but this machine has no CUDA GPU", "use cpu or auto")
    return name


def dtype_from_name(name: str, extra: tuple[str, ...] = ()) -> torch.dtype:
    """float32 / bfloat16 / float16 -> the torch dtype; `extra` names other values the caller accepts."""
    if name not in DTYPES:
        raise LPError(f"--dtype '{name}' does not exist", f"use one of {', '.join((*extra, *DTYPES))}")
    return DTYPES[name]


def compute_dtype(name: str, device: str) -> torch.dtype:
    """A measuring dtype: a name of DTYPES, or auto (float32 on the CPU, bfloat16 elsewhere)."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return dtype_from_name(name, extra=("auto",))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_positions(name: str, config, tokens: int, what: str) -> None:
    """Refuse a length beyond the positions the model was trained for: it would run (slowly) and
    measure the model outside what it knows."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise LPError(f"{what} is {tokens} tokens, beyond the {limit} positions of {name}",
                      f"use at most {limit} tokens")


def text_windows(tokenizer, text: str, *, tokens: int, seq_len: int, seed: int, split: str,
                 text_field: str = "text", also_tokens: int = 0):
    """Read the text source TEXT (only as far as the budget needs) and cut it into windows of SPLIT.

    `also_tokens`: a second budget the same text must serve (plan's held-out windows), so the
    read is large enough for both.
    """
    from .texts import bytes_for_tokens, resolve_text, tokenize_windows

    source = resolve_text(text, text_field=text_field,
                          max_bytes=bytes_for_tokens(max(tokens, also_tokens), seq_len))
    return source, tokenize_windows(tokenizer, source, seq_len=seq_len, num_tokens=tokens, seed=seed, split=split)
