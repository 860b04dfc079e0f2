"""Per-pair metrics of a scores file: which one ranks the pairs, and the ranking itself."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import LPError
from ..formats import PAIR_METRICS

# Ranking metrics in order of preference: measured loss first, then the cheap metric whose ranking
# agreed best with it on SmolLM2 (Spearman, middle pairs: pair_cosine +0.36, angular_distance +0.20,
# pair_rel_l2 -0.09; docs/benchmarks.md).
METRIC_PREFERENCE = ("loss_increase", "pair_cosine", "angular_distance", "pair_rel_l2")


def default_metric(scores: dict) -> str:
    pairs = scores.get("pairs") or []
    for metric in METRIC_PREFERENCE:
        if pairs and all(isinstance(p.get(metric), (int, float)) for p in pairs):
            return metric
    return METRIC_PREFERENCE[-1]


def pair_values(scores: dict, metric: str, path: str = "the scores") -> dict[int, float]:
    """{first layer: value} of one per-pair metric, oriented so that LOWER is safer to pair."""
    if metric not in PAIR_METRICS:
        raise LPError(f"--metric {metric} is not a per-pair metric", f"use one of {', '.join(PAIR_METRICS)}")
    sign = 1.0 if PAIR_METRICS[metric] == "low" else -1.0
    values = {}
    for entry in scores.get("pairs") or []:
        value = entry.get(metric) if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[int(entry["first"])] = sign * float(value)
    if not values:
        hint = ("re-run `lpconvert score` with --measure-loss" if metric == "loss_increase"
                else "re-run `lpconvert score`")
        raise LPError(f"{path} have no '{metric}' values for pairs", f"{hint}, or choose another --metric")
    return values


def rank_pairs(values: dict[int, float], allowed: Iterable[int]) -> list[int]:
    """Allowed pair starts, safest first (ties: lower layer first); unscored pairs are ranked last."""
    allowed = list(allowed)
    scored = sorted((p for p in allowed if p in values), key=lambda p: (values[p], p))
    return scored + [p for p in allowed if p not in values]


# ----------------------------------------------------------------------------------------------
# Single-pair loss increases: what the scores measured, summed as an (optimistic) estimate for a set


def loss_increase_values(scores: dict) -> dict[int, float] | None:
    """{first layer: measured loss increase of that pair alone}, or None when the scores have none."""
    try:
        return pair_values(scores, "loss_increase")
    except LPError:
        return None


def summed_increase(pairs: Iterable[int], increases: dict[int, float] | None) -> float | None:
    """The pairs' single-pair loss increases summed (pairs interact: an estimate); None if any is unknown."""
    if increases is None:
        return None
    pairs = list(pairs)
    if any(p not in increases for p in pairs):
        return None
    return sum(increases[p] for p in pairs)


def need_loss_increase(increases: dict[int, float] | None, strategy: str) -> dict[int, float]:
    """The single-pair loss increases a loss budget needs when the model is not measured."""
    if increases is None:
        raise LPError(f"--max-loss-increase with --strategy {strategy} needs measured losses: scores with per-pair "
                      "'loss_increase' (lpconvert score --measure-loss) or --model",
                      "re-run the scores with loss, or pass --model")
    return increases
