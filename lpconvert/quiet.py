"""Loading through transformers without its noise.

`quiet_transformers` silences the warnings and progress bars of transformers and huggingface_hub
while lpconvert loads a config, a model or a tokenizer; `first_line` cuts an exception to the one
line that an LPError quotes. Model sources (lpconvert.sources) and local folders
(lpconvert.folders) load this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers/huggingface_hub while loading."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
