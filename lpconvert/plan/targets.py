"""Targets (pairs, depth, speedup or loss budget) and the speedup cost model that turns them into a pair count."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import LPError
from ..formats import parse_percent
from .layers import max_pairs

# Cost model for the speedup estimate: decode time per token is proportional to L - ALPHA * pairs,
# i.e. each pair saves ALPHA of one layer's time. Fitted to docs/method.md section 3's H200 measurement
# of the Llama-2-7B shape (bf16, CUDA graph, batch 1): 6.58 ms at 0 pairs, 5.19 ms at 12 pairs of 32
# layers -> (1 - 5.19/6.58) * 32 / 12 = 0.56. The other measured shapes span 0.47 (Llama-3-8B) to
# 0.86 (Qwen2.5-0.5B): speedups derived from it are ESTIMATES, not measurements.
ALPHA = 0.55
SPEEDUP_NOTE = (f"estimate from a cost model (decode time ∝ L − {ALPHA}·pairs, fitted to H200 decode "
                "measurements of a Llama-2-7B shape), not a measurement")


@dataclass(frozen=True)
class Target:
    kind: str  # pairs | depth | speedup | max_loss_increase
    value: float

    def to_json(self) -> dict:
        value = int(self.value) if self.kind in ("pairs", "depth") else self.value
        return {"kind": self.kind, "value": value}

    def describe(self) -> str:
        if self.kind == "pairs":
            return f"{int(self.value)} pairs"
        if self.kind == "depth":
            return f"effective depth {int(self.value)}"
        if self.kind == "speedup":
            return f"estimated speedup ≥ {self.value:g}x"
        return f"calibration loss within {100 * self.value:g}% of the source's"


def parse_target(pairs: int | None = None, depth: int | None = None, speedup: float | None = None,
                 max_loss_increase: str | float | None = None) -> Target:
    # The parameter names are the target settings' names (lpconvert.settings.TARGETS, checked by a test).
    given = [name for name, value in (("--pairs", pairs), ("--depth", depth), ("--speedup", speedup),
                                      ("--max-loss-increase", max_loss_increase)) if value is not None]
    if len(given) != 1:
        which = f"got {', '.join(given)}" if given else "got none"
        raise LPError(f"give exactly one target: --pairs, --depth, --speedup or --max-loss-increase ({which})",
                      "e.g. --depth 25 or --speedup 1.1")
    if pairs is not None:
        if pairs < 1:
            raise LPError(f"--pairs must be at least 1, got {pairs}", "e.g. --pairs 4")
        return Target("pairs", pairs)
    if depth is not None:
        return Target("depth", depth)
    if speedup is not None:
        if not math.isfinite(speedup) or speedup <= 1:
            raise LPError(f"--speedup must be above 1, got {speedup:g}", "e.g. --speedup 1.1")
        return Target("speedup", float(speedup))
    return Target("max_loss_increase", _loss_budget(max_loss_increase))


def _loss_budget(max_loss_increase: str | float) -> float:
    value = parse_percent(max_loss_increase, "--max-loss-increase") if isinstance(max_loss_increase, str) \
        else float(max_loss_increase)
    if not math.isfinite(value) or value <= 0:
        raise LPError("--max-loss-increase must be positive", "e.g. --max-loss-increase 5%")
    return value


def estimated_speedup(num_layers: int, num_pairs: int) -> float:
    return num_layers / (num_layers - ALPHA * num_pairs)


@dataclass(frozen=True)
class Wording:
    """How messages name the target and the edge-layer rule: as options, or as a recipe's keys."""

    target: Callable[[str], str]  # "depth" -> "--depth", or "recipe key plan.target.depth"
    allow_edges: str  # what allows the edge layers
    setting: Callable[[str], str]  # another plan setting: "candidates" -> "--candidates", or "plan.candidates"


OPTIONS = Wording(lambda key: "--" + key.replace("_", "-"), "pass --allow-edge-layers",
                  lambda key: "--" + key.replace("_", "-"))
RECIPE = Wording(lambda key: f"recipe key plan.target.{key}", "set plan.allow_edge_layers: true",
                 lambda key: f"plan.{key}")


def pairs_for_target(target: Target, num_layers: int, allow_edge_layers: bool,
                     unpairable: Collection[int] = (), wording: Wording = OPTIONS) -> int | None:
    """Number of pairs a target asks for (None for a loss budget); LPError if it cannot fit. Allowing the edge
    layers is suggested only where it would make the target fit."""
    most = max_pairs(num_layers, allow_edge_layers, frozenset(unpairable))
    most_with_edges = max_pairs(num_layers, True, frozenset(unpairable))
    where = "" if allow_edge_layers else ", first and last layers excluded"
    if unpairable:
        where += ", local and global layers never paired together"

    def fix(needed: int, instead: str = "ask for fewer") -> str:
        helps = not allow_edge_layers and needed <= most_with_edges
        return instead + (f" or {wording.allow_edges}" if helps else "")

    name = wording.target(target.kind)
    if target.kind == "max_loss_increase":
        if most == 0:
            raise LPError(f"no pair fits in a model of {num_layers} layers{where}",
                          wording.allow_edges if most_with_edges else "choose a model with more layers")
        return None
    if target.kind == "pairs":
        k = int(target.value)
        if k > most:
            raise LPError(f"{name} {k} does not fit: at most {most} non-overlapping pairs fit in a model of "
                          f"{num_layers} layers{where}", fix(k))
        return k
    if target.kind == "depth":
        return _pairs_for_depth(int(target.value), num_layers, most, where, name, fix)
    return _pairs_for_speedup(target.value, num_layers, most, where, name, fix)


def _pairs_for_depth(d: int, num_layers: int, most: int, where: str, name: str, fix: Callable[..., str]) -> int:
    if d >= num_layers:
        raise LPError(f"{name} {d} is not below the model's {num_layers} layers", f"use {name.split()[-1]} "
                      f"{num_layers - 1} or less")
    if num_layers - d > most:
        raise LPError(f"{name} {d} needs {num_layers - d} pairs, but at most {most} non-overlapping pairs fit "
                      f"in a model of {num_layers} layers{where} (depth {num_layers - most} at least)",
                      fix(num_layers - d, f"ask for depth {num_layers - most} or more"))
    return num_layers - d


def _pairs_for_speedup(s: float, num_layers: int, most: int, where: str, name: str, fix: Callable[..., str]) -> int:
    """The fewest pairs whose estimated speedup reaches s.

    The exact count is rounded to 9 decimals before its ceiling is taken, so that float error in a
    count that is a whole number cannot ask for one pair more.
    """
    k = math.ceil(round(num_layers * (1 - 1 / s) / ALPHA, 9))
    if k > most:
        best = estimated_speedup(num_layers, most)
        raise LPError(f"{name} {s:g} needs {k} pairs by the cost model, but at most {most} non-overlapping pairs "
                      f"fit in a model of {num_layers} layers{where} (estimated {best:.2f}x)", fix(k))
    return max(1, k)
