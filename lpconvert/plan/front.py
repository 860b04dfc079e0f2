"""The quality/depth front: calibration perplexity against effective depth, for each strategy."""

from __future__ import annotations

import math

from ..formats import Plan
from .layers import max_pairs
from .metrics import loss_increase_values, summed_increase
from .strategies import plan_contiguous, plan_greedy


def front_series(plan: Plan, scores: dict) -> tuple[dict[str, list[dict]], float | None]:
    """Calibration perplexity against effective depth for each strategy, and the source's perplexity.

    The planned strategy contributes what it measured along the way; the others are estimated from
    the scores' single-pair loss increases (summed: pairs interact, so these are optimistic guesses).
    """
    details = plan.details
    base_loss = (details.get("source_calibration") or {}).get("loss") or (scores.get("base") or {}).get("loss")
    series: dict[str, list[dict]] = {}
    if details.get("front"):
        series[plan.strategy] = [dict(p) for p in details["front"]]
    elif "calibration" in details:
        series[plan.strategy] = [{"depth": plan.effective_depth, "perplexity": details["calibration"]["perplexity"],
                                  "measured": True}]
    increases = loss_increase_values(scores)
    if increases is not None and base_loss is not None:
        for name in ("contiguous", "greedy"):
            if name not in series and (points := _estimated_points(name, plan, increases, base_loss)):
                series[name] = points
    return series, (None if base_loss is None else math.exp(base_loss))


def _estimated_points(strategy: str, plan: Plan, increases: dict[int, float], base_loss: float) -> list[dict]:
    """The strategy's choice at every pair count, ranked by single-pair loss increases, with its summed estimate."""
    num_layers = plan.num_layers
    allow_edges = any(p == 0 or p + 2 == num_layers for p in plan.pairs)  # allowed if the plan pairs an edge layer
    unpairable = frozenset(plan.source.get("unpairable", ()))
    points = []
    for k in range(1, max_pairs(num_layers, allow_edges, unpairable) + 1):
        if strategy == "greedy":
            chosen = plan_greedy(increases, k, num_layers=num_layers, allow_edge_layers=allow_edges,
                                 unpairable=unpairable).pairs
        else:
            chosen = plan_contiguous(increases, k, num_layers=num_layers, allow_edge_layers=allow_edges,
                                     unpairable=unpairable, increases=increases).pairs
        total = summed_increase(chosen, increases)
        if len(chosen) == k and total is not None:
            points.append({"depth": num_layers - k, "perplexity": math.exp(base_loss * (1 + total)), "measured": False})
    return points
