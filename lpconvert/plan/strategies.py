"""The strategies: each turns a per-pair ranking (and, when given, the model) into a Choice of pairs.

* ``contiguous`` -- the paper's rule: one contiguous run of pairs (s, s+1), (s+2, s+3), ...; s is
  chosen by a per-pair metric summed over the run, or, with the model, by measuring every run
  (the paper's perplexity sweep).
* ``greedy`` -- the best non-overlapping pairs by a per-pair metric of the scores file.
* ``search`` -- grows the set pair by pair, measuring the model with ALL chosen pairs applied at
  every step (pairs interact), among a pool of candidates pre-ranked by the scores. Each step's
  front-runners are re-measured on the calibration text's held-out split before one is trusted.
  It has its own module, search.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

from .defaults import Progress
from .layers import NONE, candidate_starts, contiguous_runs, fits_beside, max_pairs
from .measure import Calibrator, Measured
from .metrics import rank_pairs, summed_increase


@dataclass
class Choice:
    """What a strategy chose, with what it measured and how."""

    pairs: list[int]
    measured: Measured | None = None
    heldout: Measured | None = None
    predicted_loss_increase: float | None = None  # sum of single-pair loss increases (an estimate)
    trace: list[dict] = field(default_factory=list)
    front: list[dict] = field(default_factory=list)  # [{depth, perplexity, measured}] along the way


# ----------------------------------------------------------------------------------------------
# greedy


def plan_greedy(values: dict[int, float], k: int | None, *, num_layers: int, allow_edge_layers: bool,
                unpairable: Collection[int] = NONE, increases=None, loss_budget: float | None = None) -> Choice:
    """The best pairs by the metric that do not overlap (and leave room for k in all).

    With a loss budget: the largest greedy set whose summed single-pair loss increases fit in it.
    """
    ranking = rank_pairs(values, candidate_starts(num_layers, allow_edge_layers, unpairable))
    if loss_budget is None:
        chosen = _greedy_pick(ranking, k, num_layers, allow_edge_layers, unpairable)
        return Choice(chosen, predicted_loss_increase=summed_increase(chosen, increases))
    for size in range(max_pairs(num_layers, allow_edge_layers, unpairable), 0, -1):
        chosen = _greedy_pick(ranking, size, num_layers, allow_edge_layers, unpairable)
        total = summed_increase(chosen, increases)
        if len(chosen) == size and total is not None and total <= loss_budget:
            return Choice(chosen, predicted_loss_increase=total)
    return Choice([])


def _greedy_pick(ranking: list[int], k: int | None, num_layers: int, allow_edge_layers: bool,
                 unpairable: Collection[int]) -> list[int]:
    chosen: list[int] = []
    for p in ranking:
        if k is not None and len(chosen) == k:
            break
        if fits_beside(chosen, p, k, num_layers, allow_edge_layers, unpairable):
            chosen.append(p)
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# contiguous


def plan_contiguous(values: dict[int, float], k: int | None, *, num_layers: int, allow_edge_layers: bool,
                    unpairable: Collection[int] = NONE, increases=None, loss_budget: float | None = None, calibrator: Calibrator | None = None,
                    objective: str = "loss", progress: Progress = None) -> Choice:
    """One contiguous run of pairs; by measured calibration objective when a calibrator is given."""
    if calibrator is not None:
        return plan_contiguous_measured(calibrator, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                                        unpairable=unpairable, increases=increases, loss_budget=loss_budget,
                                        objective=objective, progress=progress)
    return plan_contiguous_by_metric(values, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                                     unpairable=unpairable, increases=increases, loss_budget=loss_budget)


def _run_sizes(k: int | None, num_layers: int, allow_edge_layers: bool, unpairable: Collection[int]):
    """Run lengths to try: k, or (for a loss budget) every length from 1 up, until none fits the budget."""
    return [k] if k is not None else range(1, max_pairs(num_layers, allow_edge_layers, unpairable) + 1)


def plan_contiguous_by_metric(values: dict[int, float], k: int | None, *, num_layers: int, allow_edge_layers: bool,
                              unpairable: Collection[int] = NONE, increases=None, loss_budget: float | None = None) -> Choice:
    """The run with the lowest summed metric (unscored pairs count as infinite), ties to the lowest start.

    With a loss budget: the longest run whose summed single-pair loss increases fit in it.
    """
    best = Choice([])
    for size in _run_sizes(k, num_layers, allow_edge_layers, unpairable):
        runs = contiguous_runs(size, num_layers, allow_edge_layers, unpairable)
        if loss_budget is not None:
            runs = [r for r in runs if (total := summed_increase(r, increases)) is not None and total <= loss_budget]
        if not runs:
            break
        run = min(runs, key=lambda r: (sum(values.get(p, math.inf) for p in r), r))
        best = Choice(list(run), predicted_loss_increase=summed_increase(run, increases))
    return best


def plan_contiguous_measured(calibrator: Calibrator, k: int | None, *, num_layers: int, allow_edge_layers: bool,
                             unpairable: Collection[int] = NONE, increases=None, loss_budget: float | None = None, objective: str = "loss",
                             progress: Progress = None) -> Choice:
    """The paper's sweep: measure every run of each length, keep the best by the objective.

    With a loss budget: the longest length with a run whose measured calibration loss fits in it.
    """
    best = Choice([])
    trace, front = [], []
    for size in _run_sizes(k, num_layers, allow_edge_layers, unpairable):
        runs = contiguous_runs(size, num_layers, allow_edge_layers, unpairable)
        if not runs:
            break
        if progress:
            progress(f"contiguous: measuring {len(runs)} runs of {size} pairs")
        results = calibrator.measure(runs)
        trace.append({"pairs": size, "evaluated": [r.to_json() for r in results]})
        if loss_budget is not None:
            limit = calibrator.base["calib"].loss * (1 + loss_budget)
            results = [r for r in results if r.loss <= limit]
        if not results:
            break
        m = min(results, key=lambda r: (r.value(objective), r.pairs))
        front.append({"depth": num_layers - size, "perplexity": m.perplexity, "measured": True})
        best = Choice(list(m.pairs), measured=m, predicted_loss_increase=summed_increase(m.pairs, increases))
    best.trace, best.front = trace, front
    return best
