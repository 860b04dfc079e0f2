"""The plan stage's constants. Its choices and defaults are lpconvert.settings' (PlanSettings), shared
with the command line and recipes; the DEFAULT_* names here are read from there.

Nothing here imports torch: `lpconvert --help` reads these names.
"""

from __future__ import annotations

from collections.abc import Callable

from ..settings import OBJECTIVES, STRATEGIES, PlanSettings  # noqa: F401  (re-exported for the package)

DEFAULT_CANDIDATES = PlanSettings.candidates
DEFAULT_BEAM = PlanSettings.beam
DEFAULT_VERIFY = PlanSettings.verify
DEFAULT_TOKENS = PlanSettings.tokens
DEFAULT_HELDOUT_TOKENS = PlanSettings.heldout_tokens
CACHE_LIMIT = 2 * 1024**3  # bytes of residual streams kept between search steps
TOP_K = 256  # source tokens kept per position for the KL (the rest of the vocabulary is one bucket)

Progress = Callable[[str], None] | None  # told what is being measured, one line at a time
