"""The plan stage: run a strategy for a target and assemble the plan (pairs, what was measured, estimated and spent)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import LPError
from ..formats import Plan, source_fingerprint, validate_pairs
from ..memory import Setter, option_setter
from ..settings import PlanSettings
from .defaults import DEFAULT_BEAM, DEFAULT_CANDIDATES, DEFAULT_VERIFY, STRATEGIES, Progress
from .layers import candidate_starts
from .load import build_calibrator
from .measure import Calibrator
from .metrics import (
    default_metric,
    loss_increase_values,
    need_loss_increase,
    pair_values,
    rank_pairs,
    summed_increase,
)
from .search import plan_search
from .strategies import Choice, plan_contiguous, plan_greedy
from .targets import OPTIONS, SPEEDUP_NOTE, Target, Wording, estimated_speedup, pairs_for_target


@dataclass(frozen=True)
class SearchSettings:
    """The search's settings, recorded in the plan."""

    candidates: int = DEFAULT_CANDIDATES
    beam: int = DEFAULT_BEAM
    verify: int = DEFAULT_VERIFY

    def to_json(self) -> dict:
        return {"candidates": self.candidates, "beam": self.beam, "verify": self.verify}


def plan_stage(scores: dict, target: Target, settings: PlanSettings, source=None, *, scores_path: str = "the scores",
               progress: Progress = None, wording: Wording = OPTIONS, setter: Setter = option_setter) -> Plan:
    """The plan stage as `lpconvert plan` and `convert` run it: with a model source, pair sets are
    measured on it (a Calibrator); without, pairs are ranked from the scores alone. `wording` and `setter`:
    how messages name the settings (options, or a recipe's keys).

    The scores must already be checked against the source (formats.load_scores does it).
    """
    started = time.perf_counter()
    pairs_for_target(target, int(scores["source"]["num_layers"]), settings.allow_edge_layers,  # before measuring
                     scores["source"].get("unpairable", ()), wording)
    calibrator = build_calibrator(source, settings, progress, setter) if source is not None else None
    expected = source_fingerprint(source.config, source.store) if source is not None else None
    return make_plan(scores, target, settings, calibrator, source=expected, scores_path=scores_path,
                     progress=progress, started=started, wording=wording)


def make_plan(scores: dict, target: Target, settings: PlanSettings | None = None,
              calibrator: Calibrator | None = None, *, source: dict | None = None, scores_path: str = "the scores",
              progress: Progress = None, started: float | None = None, wording: Wording = OPTIONS) -> Plan:
    """Choose pairs for `target` and return the plan (with what was measured, estimated and spent).

    `settings` supplies the strategy, metric, edge-layer rule and search settings (defaults: PlanSettings's).
    `started` (a time.perf_counter() value) is when the stage began, so the planning time reported
    includes loading the model and measuring the source; default: now.
    """
    settings = settings or PlanSettings()
    started = time.perf_counter() if started is None else started
    source = source or scores["source"]
    num_layers = int(source["num_layers"])
    allow_edge_layers = settings.allow_edge_layers
    unpairable = frozenset(source.get("unpairable", ()))  # starts of pairs whose layers differ in attention type
    strategy = _resolve_strategy(settings.strategy, calibrator)
    metric = settings.metric or default_metric(scores)
    values = pair_values(scores, metric, scores_path)
    increases = loss_increase_values(scores)
    k = pairs_for_target(target, num_layers, allow_edge_layers, unpairable, wording)
    budget = target.value if target.kind == "max_loss_increase" else None
    search = SearchSettings(settings.candidates, settings.beam, settings.verify)

    if strategy == "greedy":
        if budget is not None:
            need_loss_increase(increases, strategy)
        choice = plan_greedy(values, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers, unpairable=unpairable,
                             increases=increases, loss_budget=budget)
    elif strategy == "contiguous":
        if budget is not None and calibrator is None:
            need_loss_increase(increases, strategy)
        choice = plan_contiguous(values, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                                 unpairable=unpairable,
                                 increases=increases, loss_budget=budget, calibrator=calibrator,
                                 objective=calibrator.objective if calibrator is not None else "loss",
                                 progress=progress)
    else:
        ranking = rank_pairs(values, candidate_starts(num_layers, allow_edge_layers, unpairable))
        choice = plan_search(calibrator, ranking, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                             unpairable=unpairable,
                             candidates=search.candidates, beam=search.beam, verify=search.verify,
                             loss_budget=budget, progress=progress)
        choice.predicted_loss_increase = summed_increase(choice.pairs, increases)

    if calibrator is not None and choice.pairs and choice.measured is None:
        if progress:
            progress("measuring the chosen pairs on the calibration text")
        choice.measured = calibrator.measure([choice.pairs])[0]
    pairs = _checked_pairs(choice, k, strategy, target, num_layers, allow_edge_layers, unpairable, wording)
    details = plan_details(choice, num_layers=num_layers, calibrator=calibrator,
                           search=search if strategy == "search" else None,
                           seconds=time.perf_counter() - started)
    return Plan(source=source, pairs=pairs, strategy=strategy, metric=metric, target=target.to_json(),
                calibration=calibration_info(calibrator, scores), details=details)


def _resolve_strategy(strategy: str | None, calibrator: Calibrator | None) -> str:
    """The strategy asked for, or the default: search with the model, greedy from the scores alone."""
    strategy = strategy or ("search" if calibrator is not None else "greedy")
    if strategy not in STRATEGIES:
        raise LPError(f"--strategy {strategy} does not exist", f"use one of {', '.join(STRATEGIES)}")
    if strategy == "search" and calibrator is None:
        raise LPError("--strategy search measures the model at every step and needs --model",
                      "pass --model MODEL, or use --strategy greedy")
    return strategy


def _checked_pairs(choice: Choice, k: int | None, strategy: str, target: Target, num_layers: int,
                   allow_edge_layers: bool, unpairable: frozenset[int], wording: Wording = OPTIONS) -> list[int]:
    """The chosen pairs, refused if they fall short of the count asked for or are empty."""
    if k is not None and len(choice.pairs) != k:
        raise LPError(f"{strategy} found only {len(choice.pairs)} of the {k} pairs asked for",
                      f"use a larger {wording.setting('candidates')} pool or another {wording.setting('strategy')}")
    pairs = validate_pairs(choice.pairs, num_layers, allow_edge_layers, unpairable)
    if not pairs:
        raise LPError(f"no set of pairs meets {target.describe()}", "allow a larger loss increase")
    return pairs


def calibration_info(calibrator: Calibrator | None, scores: dict) -> dict | None:
    """Where the plan's measurements come from: the calibration (and held-out) text, and the scores'."""
    scored = scores.get("calibration")
    if calibrator is None:
        return {"scores": scored} if scored else None
    info = dict(calibrator.provenance)
    info["objective"] = calibrator.objective
    if calibrator.heldout_provenance is not None:
        info["heldout"] = calibrator.heldout_provenance
    if scored:
        info["scores"] = scored
    return info


def plan_details(choice: Choice, *, num_layers: int, seconds: float, calibrator: Calibrator | None = None,
                 search: SearchSettings | None = None) -> dict:
    """The plan's `details`: depth and speedup estimate, measurements, cost, settings, time, trace and front.

    `search` is given for the search strategy only (its settings are recorded).
    """
    k = len(choice.pairs)
    details: dict = {
        "num_layers": num_layers,
        "num_pairs": k,
        "effective_depth": num_layers - k,
        "estimated_speedup": round(estimated_speedup(num_layers, k), 4),
        "speedup_note": SPEEDUP_NOTE,
    }
    if choice.predicted_loss_increase is not None:
        details["summed_single_pair_loss_increase"] = round(choice.predicted_loss_increase, 6)
    if calibrator is not None:
        details.update(_measured_details(choice, calibrator))
    else:
        details["cost"] = {"set_evaluations": 0, "forward_passes": 0, "note": "ranked from the scores file only"}
    if search is not None:
        details["search"] = search.to_json()
    details["planning_seconds"] = round(seconds, 1)
    if choice.trace:
        details["trace"] = choice.trace
    if choice.front:
        details["front"] = choice.front
    return details


def _measured_details(choice: Choice, calibrator: Calibrator) -> dict:
    """The objective, the source's and the choice's measurements (calibration and held-out), and the cost."""
    base = calibrator.base["calib"]
    details: dict = {"objective": calibrator.objective,
                     "source_calibration": {"loss": round(base.loss, 6), "perplexity": round(base.perplexity, 4)}}
    if choice.measured is not None:
        m = choice.measured
        details["calibration"] = dict(m.to_json(), loss_increase=round(m.loss / base.loss - 1, 6))
    if choice.heldout is not None:
        hb = calibrator.base["heldout"]
        details["heldout"] = dict(choice.heldout.to_json(), loss_increase=round(choice.heldout.loss / hb.loss - 1, 6),
                                  source_perplexity=round(hb.perplexity, 4))
    details["cost"] = calibrator.cost()
    return details
