"""The residual stream of fixed windows at one layer of the model being healed, batch by batch.

Healing walks the model from the bottom up: each pair is corrected with its input as the model
healed so far computes it (GPTQ's order), so the streams are kept at the current layer and advanced
as the pairs below are settled, never recomputed from the embedding. Every batch goes through a layer before
the next layer runs (LayerRunner.run_all), so a streamed model (streaming.py) reads each layer once per pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runner import LayerRunner

Progress = Callable[[str], None] | None  # the heal stage's progress: one message per step


class Streams:
    """Windows `ids` in batches, and each batch's residual stream at `self.layer`."""

    def __init__(self, runner: LayerRunner, ids: torch.Tensor, batch_size: int):
        self.runner = runner
        self.batches = [ids[start:start + batch_size] for start in range(0, ids.shape[0], batch_size)]
        with torch.no_grad():
            self.xs = [runner.embed(batch) for batch in self.batches]
        self.layer = 0

    @property
    def tokens(self) -> int:
        return sum(batch.numel() for batch in self.batches)

    def advance(self, stop: int, pairs=()) -> None:
        """Run every batch on to the input of layer `stop` (pairs run as the runner runs them now)."""
        if stop < self.layer:
            raise ValueError(f"streams are at layer {self.layer}, past {stop}")
        with torch.no_grad():
            self.xs = self.runner.run_all(self.xs, start=self.layer, pairs=pairs, stop=stop)
        self.layer = stop

    def loss(self, pairs=()) -> float:
        """Mean next-token NLL of the windows, running the model from here to its head."""
        nll, count = 0.0, 0
        with torch.no_grad():
            finals = self.runner.run_all(self.xs, start=self.layer, pairs=pairs)  # layer-major: each layer read once
            for x, ids in zip(finals, self.batches, strict=True):
                total, n = self.runner.nll(x, ids)
                nll, count = nll + total, count + n
        return nll / count
