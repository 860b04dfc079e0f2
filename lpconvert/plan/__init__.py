"""Plan: decide which consecutive layers to pair, for a target depth, speedup or loss budget.

The modules, in the order a plan is made:

* defaults.py   -- strategy and objective names, defaults shared with the command line and recipes
* targets.py    -- targets (pairs, depth, speedup, loss budget) and the speedup cost model (ALPHA)
* layers.py     -- where pairs fit in the layer stack
* metrics.py    -- per-pair metrics of the scores file, and the ranking they give
* measure.py    -- the Calibrator: pair sets measured on calibration text, sharing residual streams
* load.py       -- build_calibrator: the model and the calibration text, loaded into a Calibrator
* strategies.py -- the three strategies (contiguous, greedy; search.py holds the search and its
                   objective)
* assemble.py   -- make_plan: a strategy run for a target, assembled into the plan JSON
* front.py      -- the quality/depth front (perplexity against effective depth); lpconvert/plots.py draws it

Importing this package is light (no torch, transformers or matplotlib): lpconvert.settings and
`lpconvert --help` read the names below. The heavy libraries load when a Calibrator is made or a
plot is drawn.
"""

from .assemble import make_plan, plan_stage
from .defaults import (
    CACHE_LIMIT,
    DEFAULT_BEAM,
    DEFAULT_CANDIDATES,
    DEFAULT_HELDOUT_TOKENS,
    DEFAULT_TOKENS,
    DEFAULT_VERIFY,
    OBJECTIVES,
    STRATEGIES,
    TOP_K,
    Progress,
)
from .front import front_series
from .layers import contiguous_runs, max_pairs, room
from .load import build_calibrator
from .measure import Calibrator, Measured
from .search import plan_search
from .strategies import Choice, plan_contiguous, plan_greedy
from .targets import ALPHA, SPEEDUP_NOTE, Target, estimated_speedup, pairs_for_target, parse_target

__all__ = [
    "ALPHA", "CACHE_LIMIT", "DEFAULT_BEAM", "DEFAULT_CANDIDATES", "DEFAULT_HELDOUT_TOKENS", "DEFAULT_TOKENS",
    "DEFAULT_VERIFY", "OBJECTIVES", "SPEEDUP_NOTE", "STRATEGIES", "TOP_K",
    "Calibrator", "Choice", "Measured", "Progress", "Target",
    "build_calibrator", "contiguous_runs", "estimated_speedup", "front_series", "make_plan", "max_pairs",
    "pairs_for_target", "parse_target", "plan_contiguous", "plan_greedy", "plan_search", "plan_stage",
    "room",
]
