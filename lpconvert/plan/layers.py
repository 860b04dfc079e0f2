"""Where pairs fit in the layer stack.

A pair is named by its first layer p and covers layers p and p + 1; pairs never overlap, and the
first and last layers are left out unless the edge layers are allowed. `unpairable` holds the starts p
whose two layers may not share a block (a local and a global layer, archs.unpairable_starts): a run of
pairs skips them, as the contiguous rule does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

NONE: frozenset[int] = frozenset()


def allowed_range(num_layers: int, allow_edge_layers: bool) -> tuple[int, int]:
    """First and last layer that may be in a pair."""
    return (0, num_layers - 1) if allow_edge_layers else (1, num_layers - 2)


def candidate_starts(num_layers: int, allow_edge_layers: bool, unpairable: Collection[int] = NONE) -> list[int]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return [p for p in range(lo, hi) if p not in unpairable]


def max_pairs(num_layers: int, allow_edge_layers: bool, unpairable: Collection[int] = NONE) -> int:
    return room([], num_layers, allow_edge_layers, unpairable)


def compatible(pairs: Iterable[int], p: int) -> bool:
    return all(abs(p - q) >= 2 for q in pairs)


def packed_run(start: int, k: int, num_layers: int, allow_edge_layers: bool,
               unpairable: Collection[int] = NONE) -> tuple[int, ...] | None:
    """k pairs from `start` on, each beginning right after the last (one layer later where the next two layers
    may not pair), or None when they do not fit."""
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    run, p = [], start
    while len(run) < k and p < hi:
        if p in unpairable:
            p += 1
            continue
        run.append(p)
        p += 2
    return tuple(run) if len(run) == k and start >= lo and start not in unpairable else None


def contiguous_runs(k: int, num_layers: int, allow_edge_layers: bool,
                    unpairable: Collection[int] = NONE) -> list[tuple[int, ...]]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    runs = (packed_run(s, k, num_layers, allow_edge_layers, unpairable) for s in range(lo, hi))
    return [run for run in runs if run is not None]


def room(pairs: Iterable[int], num_layers: int, allow_edge_layers: bool, unpairable: Collection[int] = NONE) -> int:
    """How many more non-overlapping pairs fit beside `pairs`."""
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    used = {q for p in pairs for q in (p, p + 1)}
    count = run = 0
    for layer in range(lo, hi + 1):
        if layer in used or (layer - 1) in unpairable:  # a used layer, or one that may not pair with the last
            count, run = count + run // 2, 0
        if layer not in used:
            run += 1
    return count + run // 2


def keeps_target_reachable(pairs: Iterable[int], p: int, k: int | None, num_layers: int,
                           allow_edge_layers: bool, unpairable: Collection[int] = NONE) -> bool:
    """Adding p to `pairs` still leaves room for k pairs in all (always true without a count)."""
    if k is None:
        return True
    grown = [*pairs, p]
    return len(grown) + room(grown, num_layers, allow_edge_layers, unpairable) >= k


def fits_beside(pairs: Iterable[int], p: int, k: int | None, num_layers: int, allow_edge_layers: bool,
                unpairable: Collection[int] = NONE) -> bool:
    """p overlaps none of `pairs`, and adding it still leaves room for k pairs in all."""
    return (p not in unpairable and compatible(pairs, p)
            and keeps_target_reachable(pairs, p, k, num_layers, allow_edge_layers, unpairable))
