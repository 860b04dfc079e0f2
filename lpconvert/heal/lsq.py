"""lsq: refit each pair's down_proj by ridge least squares, in order of depth (training-free).

For a pair of layers (a, b) the wide block computes h = x + Attn_a(x) + Attn_b(x) and then
y = h + W z, where z = [inner_a(h) | inner_b(h)] is what the fused down_proj W reads. The target
for y is, per token of the calibration windows,

* local (default): layer b after layer a, run in sequence on the same (healed) input x;
* global: the source model's own stream after layer b on the same tokens, so the fit also tries to
  correct what the pairs below left wrong (measured 1-2 points of recovered gap worse than local on
  SmolLM2, docs/quality.md).

W = argmin ||Z W^T - (T - h)||^2 + d m ||W - W_0||^2 (m the mean diagonal of Z^T Z, W_0 the
pair's current weights), solved by Cholesky from the Gram matrix Z^T Z and Z^T (T - h) summed
over the windows: memory is one Gram per pair, (2 x intermediate)^2 floats. Which damping d is
kept is decided on held-out windows by the model's own loss, and a pair whose best correction
does not lower the held-out loss keeps its weights (rejected).

With sandwich norms (Gemma 3) each half's output is RMS-normed and scaled by its norm's g_h before
the sum: y = h + sum_h g_h * n(W_h z_h), n(u) = u / rms(u). A norm is scale-invariant, so a half can
only choose the direction of its output, and one least-squares fit of [W_a | W_b] through a norm
linearised at the current weights does not carry over (on Gemma-3-270M the linearised residual fell
to 0.08 while the real one stayed at 0.97, docs/quality.md). Each half is fitted on its own instead,
to a direction: half a to what layer a's MLP adds when it runs alone on x (its sequential output),
half b to the rest of the target, T - h minus that. Half h's target t_h becomes the output its W_h
should give, u_h = rms(W_h z_h) n(t_h / g_h) (the direction that norm and g_h turn into t_h, at the
current output's scale), and W_h is the ridge fit of u_h from z_h (one Gram per half).
"""

from __future__ import annotations

import time

import torch

from ..runner import LayerRunner
from .streams import Progress, Streams


class Normal:
    """The normal equations of one pair's least-squares fit, summed over windows."""

    def __init__(self, inputs: int, outputs: int, device):
        dtype = torch.float64 if torch.device(device).type != "mps" else torch.float32
        self.gram = torch.zeros(inputs, inputs, dtype=dtype, device=device)  # Z^T Z
        self.cross = torch.zeros(inputs, outputs, dtype=dtype, device=device)  # Z^T Y
        self.target_energy = 0.0  # ||Y||^2
        self.tokens = 0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        # Each batch's products in float32 (fast), summed in float64 (no drift over many batches).
        z, y = z.reshape(-1, z.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        self.gram += (z.T @ z).to(self.gram.dtype)
        self.cross += (z.T @ y).to(self.cross.dtype)
        self.target_energy += float(y.double().pow(2).sum())
        self.tokens += z.shape[0]

    def solve(self, current: torch.Tensor, damping: float) -> torch.Tensor:
        """Ridge solution shrunk toward `current` (outputs x inputs), as float32."""
        strength = damping * float(self.gram.diagonal().mean())
        system = self.gram.clone()
        system.diagonal().add_(strength)
        rhs = self.cross + strength * current.T.to(self.cross.dtype)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs, factor)
        else:  # not positive definite in floating point (tiny damping on a degenerate Gram)
            solution = torch.linalg.lstsq(system, rhs).solution
        return solution.T.float().contiguous()

    def residual(self, weight: torch.Tensor) -> float:
        """||Z W^T - Y||^2 / ||Y||^2: the fit's objective on these windows, relative."""
        w = weight.to(self.gram.dtype)
        energy = float(((w @ self.gram) * w).sum()) - 2 * float((w * self.cross.T).sum()) + self.target_energy
        return max(energy, 0.0) / max(self.target_energy, 1e-30)


class BranchNormals:
    """A sandwich pair's fit, one Normal per half: the same interface as Normal on [W_a | W_b]."""

    def __init__(self, normals: list[Normal]):
        self.normals = normals
        self.tokens = normals[0].tokens

    def solve(self, current: torch.Tensor, damping: float) -> torch.Tensor:
        halves = current.chunk(len(self.normals), dim=1)
        return torch.cat([n.solve(w, damping) for n, w in zip(self.normals, halves, strict=True)], dim=1)

    def residual(self, weight: torch.Tensor) -> float:
        """Both halves' residuals, weighted by their targets' energy."""
        halves = weight.chunk(len(self.normals), dim=1)
        energy = sum(n.target_energy for n in self.normals)
        return sum(n.residual(w) * n.target_energy for n, w in zip(self.normals, halves, strict=True)) / energy


def _rms(u: torch.Tensor) -> torch.Tensor:
    return u.float().pow(2).mean(-1, keepdim=True).sqrt()


def branch_targets(runner: LayerRunner, pair: int, x: torch.Tensor, h: torch.Tensor, z: torch.Tensor,
                   target: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """What each half of a sandwich pair's down_proj should output (module docstring): half a towards layer a's
    own MLP output on x, half b towards the rest; each as a direction through its post-norm, at today's scale."""
    alone = runner.layer(pair, x) - (x + runner.attention(pair, x))  # layer a's post-normed MLP output, sequential
    wanted = [alone, target - h - alone]
    gains = runner.output_gains(pair, "down_proj")
    outputs = []
    for half, (w, features) in enumerate(zip(weight.chunk(2, dim=1), z.chunk(2, dim=-1), strict=True)):
        current = torch.nn.functional.linear(features.float(), w.float())
        direction = wanted[half].float() / gains[half].to(current)
        outputs.append(direction / _rms(direction).clamp_min(1e-12) * _rms(current))
    return outputs


def pair_normal_equations(runner: LayerRunner, pair: int, calib: Streams, source: Streams | None
                          ) -> Normal | BranchNormals:
    """Sum the normal equations of `pair`'s down_proj over the calibration windows (one per half for a
    sandwich pair).

    `calib` holds the healed model's stream at the pair's input; `source` (global target) the
    source model's, which is moved on past the pair's two layers here.
    """
    weight, bias = runner.projection(pair, "down_proj")
    normal = None
    targets = []
    with torch.no_grad():
        for k, x in enumerate(calib.xs):
            h = x + runner.pair_attention(pair, x)
            z = runner.pair_inputs(pair, h, "down_proj")
            if source is not None:
                target = runner.layer(pair + 1, runner.layer(pair, source.xs[k]))
                targets.append(target)
            else:
                target = runner.layer(pair + 1, runner.layer(pair, x))
            if runner.norms.sandwich:
                outputs = branch_targets(runner, pair, x, h, z, target, weight)
                if normal is None:
                    normal = BranchNormals([Normal(z.shape[-1] // 2, target.shape[-1], weight.device)
                                            for _ in outputs])
                for n, features, wanted in zip(normal.normals, z.chunk(2, dim=-1), outputs, strict=True):
                    n.add(features, wanted)
                normal.tokens = normal.normals[0].tokens
                continue
            y = target - h - (0 if bias is None else bias.to(h))
            if normal is None:
                normal = Normal(z.shape[-1], y.shape[-1], weight.device)
            normal.add(z, y)
    if source is not None:
        source.xs, source.layer = targets, pair + 2
    return normal


def heal_lsq(runner: LayerRunner, pairs: list[int], calib: Streams, heldout: Streams, *, target: str,
             damping: tuple[float, ...], source: Streams | None = None, progress: Progress = None) -> list[dict]:
    """Fit every pair in order of depth; accepted fits are left in runner.corrections. One report row per pair."""
    rows = []
    before = None  # the held-out loss with the pairs below settled: the last pair's outcome, once known
    for number, pair in enumerate(sorted(pairs), start=1):
        started = time.perf_counter()
        if progress:
            progress(f"pair {number}/{len(pairs)} ({pair}, {pair + 1}): least squares on {calib.tokens} tokens")
        calib.advance(pair, pairs)
        heldout.advance(pair, pairs)
        if source is not None:
            source.advance(pair)
        normal = pair_normal_equations(runner, pair, calib, source if target == "global" else None)
        current, _ = runner.projection(pair, "down_proj")
        if before is None:
            before = heldout.loss(pairs)
        tried = []
        for strength in damping:
            weight = normal.solve(current, strength)
            runner.corrections[pair] = {"down_proj": weight}
            tried.append({"damping": strength, "heldout_loss": heldout.loss(pairs), "weight": weight})
            del runner.corrections[pair]
        best = min(tried, key=lambda t: t["heldout_loss"])
        accepted = best["heldout_loss"] < before
        if accepted:
            runner.corrections[pair] = {"down_proj": best["weight"]}
        rows.append({
            "pair": [pair, pair + 1],
            "accepted": accepted,
            "damping": best["damping"],
            "calib_residual_before": round(normal.residual(current), 6),
            "calib_residual_after": round(normal.residual(best["weight"]), 6),
            "heldout_loss_before": round(before, 6),
            "heldout_loss_after": round(best["heldout_loss"] if accepted else before, 6),
            "heldout_loss_tried": {f"{t['damping']:g}": round(t["heldout_loss"], 6) for t in tried},
            "tokens": normal.tokens,
            "seconds": round(time.perf_counter() - started, 1),
        })
        del normal
        # The streams run exactly the layers the evaluation ran: the next pair's "before" is this outcome.
        before = best["heldout_loss"] if accepted else before
    return rows
