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

With sandwich norms (Gemma 3) each half's W_h z_h is RMS-normed and scaled by the norm's g_h before the
sum: y = h + sum_h g_h * (W_h z_h) / rms(W_h z_h). The norm is scale-invariant, so the fit is linearised
at the current weights: the RMS of each half's output is held per token (r_h), and V_h = diag(g_h) W_h is
fitted to T - h from the features z_h / r_h, the same ridge problem; then W_h = diag(g_h)^-1 V_h. The
held-out check runs the real post-norms, so a linearisation that does not carry over is rejected.
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


def fit_space(weight: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """[W_a | W_b] as the fit sees it: each half's rows scaled by its post-norm's gains (sandwich), else as is."""
    if gains is None:
        return weight
    return torch.cat([w * g.to(w)[:, None] for w, g in zip(weight.chunk(2, dim=1), gains, strict=True)], dim=1)


def weight_space(fitted: torch.Tensor, gains: torch.Tensor | None, current: torch.Tensor) -> torch.Tensor:
    """The inverse of fit_space; a row whose gain is about 0 (its output normed away) keeps its current weights."""
    if gains is None:
        return fitted
    halves = []
    for v, g, w in zip(fitted.chunk(2, dim=1), gains, current.chunk(2, dim=1), strict=True):
        live = g.abs() > 1e-6
        halves.append(torch.where(live[:, None], v / torch.where(live, g, 1.0)[:, None], w.float()))
    return torch.cat(halves, dim=1).contiguous()


def pair_normal_equations(runner: LayerRunner, pair: int, calib: Streams, source: Streams | None
                          ) -> tuple[Normal, torch.Tensor | None]:
    """Sum the normal equations of `pair`'s down_proj over the calibration windows; with sandwich norms, also
    the post-norms' gains (the fit is in fit_space).

    `calib` holds the healed model's stream at the pair's input; `source` (global target) the
    source model's, which is moved on past the pair's two layers here.
    """
    weight, bias = runner.projection(pair, "down_proj")
    normal = None
    gains = None
    targets = []
    with torch.no_grad():
        for k, x in enumerate(calib.xs):
            h = x + runner.pair_attention(pair, x)
            z = runner.pair_inputs(pair, h, "down_proj")
            scales = runner.branch_scales(pair, "down_proj", z)
            if scales is not None:  # sandwich: each half's features over its output's RMS, held per token
                inverse_rms, gains = scales
                z = torch.cat([half * inverse_rms[..., i:i + 1].to(half)
                               for i, half in enumerate(z.chunk(2, dim=-1))], dim=-1)
                bias = None  # Gemma's projections have none
            if source is not None:
                target = runner.layer(pair + 1, runner.layer(pair, source.xs[k]))
                targets.append(target)
            else:
                target = runner.layer(pair + 1, runner.layer(pair, x))
            y = target - h - (0 if bias is None else bias.to(h))
            if normal is None:
                normal = Normal(z.shape[-1], y.shape[-1], weight.device)
            normal.add(z, y)
    if source is not None:
        source.xs, source.layer = targets, pair + 2
    return normal, gains


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
        normal, gains = pair_normal_equations(runner, pair, calib, source if target == "global" else None)
        current_weight, _ = runner.projection(pair, "down_proj")
        current = fit_space(current_weight.float(), gains)
        if before is None:
            before = heldout.loss(pairs)
        tried = []
        for strength in damping:
            fitted = normal.solve(current, strength)
            weight = weight_space(fitted, gains, current_weight)
            runner.corrections[pair] = {"down_proj": weight}
            tried.append({"damping": strength, "heldout_loss": heldout.loss(pairs), "weight": weight, "fitted": fitted})
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
            "calib_residual_after": round(normal.residual(best["fitted"]), 6),
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
