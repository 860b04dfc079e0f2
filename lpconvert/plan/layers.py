"""Where pairs fit in the layer stack.

A pair is named by its first layer p and covers layers p and p + 1; pairs never overlap, and the
first and last layers are left out unless the edge layers are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable


def allowed_range(num_layers: int, allow_edge_layers: bool) -> tuple[int, int]:
    """First and last layer that may be in a pair."""
    return (0, num_layers - 1) if allow_edge_layers else (1, num_layers - 2)


def candidate_starts(num_layers: int, allow_edge_layers: bool) -> list[int]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return list(range(lo, hi))


def max_pairs(num_layers: int, allow_edge_layers: bool) -> int:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return max(0, (hi - lo + 1) // 2)


def compatible(pairs: Iterable[int], p: int) -> bool:
    return all(abs(p - q) >= 2 for q in pairs)


def contiguous_runs(k: int, num_layers: int, allow_edge_layers: bool) -> list[tuple[int, ...]]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return [tuple(range(s, s + 2 * k, 2)) for s in range(lo, hi - 2 * k + 2)]


def room(pairs: Iterable[int], num_layers: int, allow_edge_layers: bool) -> int:
    """How many more non-overlapping pairs fit beside `pairs`."""
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    used = {q for p in pairs for q in (p, p + 1)}
    count = run = 0
    for layer in range(lo, hi + 1):
        if layer in used:
            count, run = count + run // 2, 0
        else:
            run += 1
    return count + run // 2


def keeps_target_reachable(pairs: Iterable[int], p: int, k: int | None, num_layers: int,
                           allow_edge_layers: bool) -> bool:
    """Adding p to `pairs` still leaves room for k pairs in all (always true without a count)."""
    if k is None:
        return True
    grown = [*pairs, p]
    return len(grown) + room(grown, num_layers, allow_edge_layers) >= k


def fits_beside(pairs: Iterable[int], p: int, k: int | None, num_layers: int, allow_edge_layers: bool) -> bool:
    """p overlaps none of `pairs`, and adding it still leaves room for k pairs in all."""
    return compatible(pairs, p) and keeps_target_reachable(pairs, p, k, num_layers, allow_edge_layers)
