"""The search strategy: grow the set pair by pair, measuring the model with all chosen pairs applied.

The objective (lpconvert/plan/objectives.py) defaults to top1_copy. Its first part, top1, is how often
the paired model's most likely next token differs from the source's on the calibration text:
benchmarks score a model by which answer it ranks first. Its second part is the loss on words the window
already holds, which LAMBADA-like tasks ask for. top1 alone chose a Gemma-3-270M plan that lost them.
The sum ordered plans by benchmark accuracy as well as the best single objective on both real models
(docs/quality.md, "Which objective predicts task accuracy"). The NLL of the text ranked them worst on
Gemma-3-270M: a plan can predict the text's tokens well and still change which answer comes first.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from ..errors import LPError
from .defaults import DEFAULT_BEAM, DEFAULT_CANDIDATES, DEFAULT_VERIFY, Progress
from .layers import NONE, candidate_starts, fits_beside, max_pairs
from .measure import Calibrator, Measured
from .strategies import Choice

PairSet = tuple[int, ...]


def plan_search(calibrator: Calibrator, ranking: list[int], k: int | None, *, num_layers: int,
                allow_edge_layers: bool, unpairable: Collection[int] = NONE, candidates: int = DEFAULT_CANDIDATES,
                beam: int = DEFAULT_BEAM, verify: int = DEFAULT_VERIFY, loss_budget: float | None = None,
                progress: Progress = None) -> Choice:
    """Grow the set pair by pair, measuring the model with all chosen pairs applied.

    The first step measures every pair that fits, alone: that ranks the pairs by the objective itself
    (what the scores' metric only estimates), and the later steps choose among the `candidates` best
    of that ranking. At each step every pool candidate compatible with each beam set is measured on the calibration
    windows (branching off the beam set's stream at the candidate's layer). When held-out windows
    exist, the `verify` best expansions are also measured there, and the beam keeps the best by the
    token-weighted mean of both measurements (the held-out text guards against a choice that only
    fits the calibration sample).
    """
    if candidates < 1:
        raise LPError(f"--candidates must be at least 1, got {candidates}", "e.g. --candidates 10")
    if beam < 1:
        raise LPError(f"--beam must be at least 1, got {beam}", "e.g. --beam 2")
    return _Search(calibrator, ranking, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                   unpairable=unpairable, candidates=candidates, beam=beam, verify=verify, loss_budget=loss_budget, progress=progress).run()


class _Search:
    """One run of plan_search: its settings, and one method per part of a step."""

    def __init__(self, calibrator: Calibrator, ranking: list[int], k: int | None, *, num_layers: int,
                 allow_edge_layers: bool, unpairable: Collection[int], candidates: int, beam: int, verify: int,
                 loss_budget: float | None, progress: Progress):
        self.calibrator = calibrator
        allowed = candidate_starts(num_layers, allow_edge_layers, unpairable)
        ranked = [p for p in ranking if p in allowed]
        self.ranking = ranked + [p for p in allowed if p not in ranked]  # re-ranked by the first step (ranked_by_first_step)
        self.pool = list(self.ranking)  # the first step measures every pair that fits
        self.candidates = candidates
        self.k = k
        self.num_layers = num_layers
        self.allow_edge_layers = allow_edge_layers
        self.unpairable = unpairable
        self.beam = beam
        self.verify = verify
        self.progress = progress
        self.objective = calibrator.objective
        self.goal = k if k is not None else max_pairs(num_layers, allow_edge_layers, unpairable)  # a budget: grow while it holds
        base = calibrator.base["calib"]
        self.loss_limit = None if loss_budget is None else base.loss * (1 + loss_budget)
        self.use_heldout = calibrator.has_heldout and verify > 0
        self.calib_weight = calibrator.tokens("calib")
        self.heldout_weight = calibrator.tokens("heldout") if self.use_heldout else 0

    def run(self) -> Choice:
        beam_sets: list[PairSet] = [()]
        chosen: Measured | None = None
        chosen_heldout: Measured | None = None
        trace, front = [], []
        for step in range(1, self.goal + 1):
            expansions = self.expand(beam_sets, step)
            ranked = self.within_budget(sorted(expansions.values(), key=self.by_objective))
            if not ranked:
                break
            held: dict[PairSet, Measured] = {}
            if self.use_heldout:
                held = self.measure_heldout(ranked, beam_sets, step)
                ranked = sorted(ranked, key=lambda m: (self.combined(m, held[m.pairs]) if m.pairs in held
                                                       else math.inf, *self.by_objective(m)))
            if step == 1:
                self.ranked_by_first_step(expansions)
            beam_sets = [m.pairs for m in ranked[:self.beam]]
            chosen, chosen_heldout = ranked[0], held.get(ranked[0].pairs)
            trace.append(self.trace_step(step, expansions, held, beam_sets))
            front.append({"depth": self.num_layers - step, "perplexity": chosen.perplexity, "measured": True})
        pairs = list(chosen.pairs) if chosen is not None else []
        return Choice(pairs, measured=chosen, heldout=chosen_heldout, trace=trace, front=front)

    # --- one step ------------------------------------------------------------------------------

    def expand(self, beam_sets: list[PairSet], step: int) -> dict[PairSet, Measured]:
        """Measure every set that adds one fitting pair to a beam set (each branching off its beam set)."""
        expansions: dict[PairSet, Measured] = {}
        for current in beam_sets:
            grown = dict.fromkeys(tuple(sorted((*current, p))) for p in self.options(current))
            new = [s for s in grown if s not in expansions]  # a set two beam sets reach is measured once
            if self.progress:
                self.progress(f"search step {step}/{self.goal}: measuring {len(new)} sets of {step} pairs")
            for m in self.calibrator.measure(new, base=current):
                expansions[m.pairs] = m
        return expansions

    def ranked_by_first_step(self, singles: dict[PairSet, Measured]) -> None:
        """Rank the pairs by their own measurement alone (unmeasured ones after, in the scores' order); the
        pool becomes the `candidates` best."""
        measured = sorted((m for m in singles.values() if len(m.pairs) == 1), key=self.by_objective)
        firsts = [m.pairs[0] for m in measured]
        self.ranking = firsts + [p for p in self.ranking if p not in firsts]
        self.pool = self.ranking[:self.candidates]

    def options(self, current: PairSet) -> list[int]:
        """Pool pairs that fit beside `current`; once the pool is used up, the next-ranked pairs that do."""
        options = [p for p in self.pool if self.fits(current, p)]
        if not options:
            options = [p for p in self.ranking if self.fits(current, p)][:max(1, self.candidates // 2)]
        return options

    def fits(self, current: PairSet, p: int) -> bool:
        return fits_beside(current, p, self.k, self.num_layers, self.allow_edge_layers, self.unpairable)

    def within_budget(self, ranked: list[Measured]) -> list[Measured]:
        if self.loss_limit is None:
            return ranked
        return [m for m in ranked if m.loss <= self.loss_limit]

    def measure_heldout(self, ranked: list[Measured], beam_sets: list[PairSet], step: int
                        ) -> dict[PairSet, Measured]:
        """Measure the step's front-runners on the held-out windows, each branching off the beam set it grew from."""
        finalists = ranked[:max(self.verify, self.beam)]
        if self.progress:
            self.progress(f"search step {step}/{self.goal}: checking {len(finalists)} sets on held-out text")
        by_base: dict[PairSet, list[PairSet]] = {}
        for m in finalists:
            parent = next((b for b in beam_sets if set(b) <= set(m.pairs)), ())
            by_base.setdefault(parent, []).append(m.pairs)
        held = {}
        for parent, sets in by_base.items():
            for h in self.calibrator.measure(sets, base=parent, split="heldout"):
                held[h.pairs] = h
        return held

    # --- ordering and the record ---------------------------------------------------------------

    def by_objective(self, m: Measured) -> tuple:
        return m.value(self.objective), m.pairs

    def combined(self, m: Measured, heldout: Measured) -> float:
        """The objective averaged over the calibration and held-out measurements, weighted by their tokens."""
        return ((m.value(self.objective) * self.calib_weight + heldout.value(self.objective) * self.heldout_weight)
                / (self.calib_weight + self.heldout_weight))

    def trace_step(self, step: int, expansions: dict[PairSet, Measured], held: dict[PairSet, Measured],
                   beam_sets: list[PairSet]) -> dict:
        evaluated = []
        for m in sorted(expansions.values(), key=self.by_objective):
            entry = m.to_json()
            if m.pairs in held:
                entry.update(heldout=held[m.pairs].to_json(), combined=round(self.combined(m, held[m.pairs]), 6))
            evaluated.append(entry)
        return {"step": step, "evaluated": evaluated, "kept": [list(s) for s in beam_sets],
                "forward_passes": round(self.calibrator.forward_passes, 2)}
