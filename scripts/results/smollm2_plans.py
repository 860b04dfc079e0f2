"""SmolLM2-135M's plans: the pairs `lpconvert plan`'s strategies chose with the CLI's defaults (quality_front.py,
docs/quality.md's issue 5 table). One definition for the scripts here that measure them (heal_front, task_table,
gguf_bench, vllm_bench)."""

from __future__ import annotations

import json
from pathlib import Path

# (effective depth, strategy) -> pair starts. 30 layers: depth 27 is 3 pairs.
SMOLLM2_PLANS = {
    (27, "contiguous"): [17, 19, 21],
    (27, "search"): [7, 17, 25],
    (25, "contiguous"): [18, 20, 22, 24, 26],
    (25, "search"): [7, 17, 19, 24, 26],
    (23, "contiguous"): [14, 16, 18, 20, 22, 24, 26],
    (23, "search"): [7, 13, 17, 19, 21, 24, 26],
}


def plans_from(path: Path | None) -> dict[tuple[int, str], list[int]]:
    """(depth, strategy) -> pairs: SmolLM2's table, or the rows of a quality front's JSON (quality_front.py --out)."""
    if path is None:
        return SMOLLM2_PLANS
    return {(row["depth"], row["strategy"]): row["pairs"] for row in json.loads(path.read_text())["rows"]}
