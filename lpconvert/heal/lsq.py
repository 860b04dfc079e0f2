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
over the windows. Which damping d is kept is decided on held-out windows by the model's own loss,
and a pair whose best correction does not lower the held-out loss keeps its weights (rejected).

With sandwich norms (Gemma 3) each half's output is RMS-normed and scaled by its norm's g_h before
the sum: y = h + sum_h g_h * n(W_h z_h), n(u) = u / rms(u). A norm is scale-invariant, so a half can
only choose the direction of its output, and one least-squares fit of [W_a | W_b] through a norm
linearised at the current weights does not carry over (on Gemma-3-270M the linearised residual fell
to 0.08 while the real one stayed at 0.97, docs/quality.md). Each half is fitted on its own instead,
to a direction: half a to what layer a's MLP adds when it runs alone on x (its sequential output),
half b to the rest of the target, T - h minus that. Half h's target t_h becomes the output its W_h
should give, u_h = rms(W_h z_h) n(t_h / g_h) (the direction that norm and g_h turn into t_h, at the
current output's scale), and W_h is the ridge fit of u_h from z_h (one Gram per half).

Memory (lsq_memory_bytes), for one pair, with n = 2 x intermediate (what down_proj reads), m = hidden,
f = 8 bytes (float64; 4 on MPS, which has no float64), s = one Gram's side (n, or n / 2 per half with
sandwich norms), g = the Grams (1, or 2 with sandwich norms) and B = BLOCK:

    peak = f g s^2           the Gram(s) Z^T Z: the only n x n memory, one copy each
         + f n m             the cross terms Z^T Y
         + f s m             one solve's right-hand side, solved in place
         + 4 n m (3 + [g=2]) float32 weights: the pair's current down_proj, the best candidate so far, the new
                             one (and its halves before they are joined, with sandwich norms)
         + 3 f s B           block temporaries: the diagonal blocks set aside, a panel and its copy

The Gram is summed a block row at a time (float32 products, float64 sums: no n x n temporary), only its
upper block triangle (mirrored once before solving); for each damping it is factored in place by a blocked
Cholesky that writes only the lower triangle and diagonal blocks, the system is solved in place in the
right-hand side, and the Gram is put back from its untouched upper triangle and the diagonal blocks set aside.
At Llama-2-7B width (n = 22016, m = 4096) this is 6.5 GiB; at Llama-3-70B width (n = 57344, m = 8192)
38.1 GiB, of which 24.5 GiB is the Gram. Activations (one batch's Z and targets) are the stage's to count with
its streams. A Gram that is not positive definite even with the damping (a tiny damping on a degenerate
Gram) falls back to a least-squares solve, which needs a second n x n matrix beyond this bound.
"""

from __future__ import annotations

import time

import torch

from ..runner import LayerRunner
from .streams import Progress, Streams

BLOCK = 1024  # rows of the Gram worked on at once: every temporary is a few (BLOCK x width) slices


def lsq_memory_bytes(config, device_type: str = "cpu") -> int:
    """Peak bytes lsq's fit of one pair holds beyond the model and its activations (module docstring)."""
    from ..archs import ARCHITECTURES

    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    halves = 2 if arch is not None and arch.norms.sandwich else 1  # one Gram per half with sandwich norms
    inputs, hidden = 2 * int(config.intermediate_size), int(config.hidden_size)
    side = inputs // halves
    f = 4 if device_type == "mps" else 8
    grams = halves * f * side**2
    solve = f * inputs * hidden + f * side * hidden + 3 * f * side * min(BLOCK, side)
    weights = 4 * inputs * hidden * (3 + (halves == 2))
    return grams + solve + weights

def _blocks(size: int) -> list[slice]:
    return [slice(start, min(start + BLOCK, size)) for start in range(0, size, BLOCK)]


def _mirror_upper(a: torch.Tensor, blocks: list[slice]) -> None:
    """Copy the strictly upper off-diagonal blocks of the square `a` onto the lower ones (no n x n temporary)."""
    for rows in blocks[1:]:
        a[rows, :rows.start] = a[:rows.start, rows].T


def _cholesky_(a: torch.Tensor, blocks: list[slice]) -> bool:
    """Factor the symmetric `a` = L L^T in place (blocked, right-looking), False where it is not positive definite.

    L is written to the lower off-diagonal blocks and to the diagonal blocks; the strictly upper off-diagonal
    blocks are never written, so they still hold `a` (LAPACK's potrf would too, but torch zeroes them)."""
    size = a.shape[0]
    for k, rows in enumerate(blocks):
        factor, info = torch.linalg.cholesky_ex(a[rows, rows])
        if int(info) != 0:
            return False
        a[rows, rows] = factor
        if rows.stop == size:
            break
        # The panel below: L_ik = A_ik L_kk^-T, then the trailing update of the lower triangle, block row by row.
        panel = torch.linalg.solve_triangular(factor.mT, a[rows.stop:, rows], upper=True, left=False)
        a[rows.stop:, rows] = panel
        for later in blocks[k + 1:]:
            a[later, rows.stop:later.stop].addmm_(panel[later.start - rows.stop:later.stop - rows.stop],
                                                  panel[:later.stop - rows.stop].T, alpha=-1)
    return True


def _cholesky_solve_(a: torch.Tensor, b: torch.Tensor, blocks: list[slice]) -> None:
    """Solve L L^T x = b in place in `b`, L the lower triangle that _cholesky_ left in `a`."""
    for rows in blocks:  # L y = b
        if rows.start:
            b[rows].addmm_(a[rows, :rows.start], b[:rows.start], alpha=-1)
        b[rows] = torch.linalg.solve_triangular(a[rows, rows], b[rows], upper=False)
    for rows in reversed(blocks):  # L^T x = y
        if rows.stop < a.shape[0]:
            b[rows].addmm_(a[rows.stop:, rows].T, b[rows.stop:], alpha=-1)
        b[rows] = torch.linalg.solve_triangular(a[rows, rows].T, b[rows], upper=True)


class Normal:
    """The normal equations of one pair's least-squares fit, summed over windows.

    One float64 Gram is all the n x n memory there is: it is summed block row by block row, factored in place
    for each damping and put back from its untouched upper triangle (module docstring: the memory bound)."""

    def __init__(self, inputs: int, outputs: int, device):
        dtype = torch.float64 if torch.device(device).type != "mps" else torch.float32
        self.gram = torch.zeros(inputs, inputs, dtype=dtype, device=device)  # Z^T Z
        self.cross = torch.zeros(inputs, outputs, dtype=dtype, device=device)  # Z^T Y
        self.target_energy = 0.0  # ||Y||^2
        self.tokens = 0
        self.blocks = _blocks(inputs)
        self.symmetric = True  # the lower triangle is filled in (add() sums only the upper one)

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        # Each batch's products in float32 (fast), summed in float64 (no drift over many batches); the Gram's
        # upper block triangle only (half the work), a block row at a time (no n x n float32 product).
        z, y = z.reshape(-1, z.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        for rows in self.blocks:
            self.gram[rows, rows.start:] += z[:, rows].T @ z[:, rows.start:]
            self.cross[rows] += z[:, rows].T @ y
        self.target_energy += float(y.double().pow(2).sum())
        self.tokens += z.shape[0]
        self.symmetric = False

    def _complete(self) -> None:
        if not self.symmetric:
            _mirror_upper(self.gram, self.blocks)
            self.symmetric = True

    def solve(self, current: torch.Tensor, damping: float) -> torch.Tensor:
        """Ridge solution shrunk toward `current` (outputs x inputs), as float32."""
        self._complete()
        strength = damping * float(self.gram.diagonal().mean())
        rhs = self.cross.clone()
        for rows in self.blocks:
            rhs[rows] += strength * current[:, rows].T.to(rhs.dtype)
        diagonal = [self.gram[rows, rows].clone() for rows in self.blocks]  # what factoring overwrites
        self.gram.diagonal().add_(strength)
        factored = _cholesky_(self.gram, self.blocks)
        if factored:
            _cholesky_solve_(self.gram, rhs, self.blocks)
        for rows, block in zip(self.blocks, diagonal, strict=True):  # put the Gram back
            self.gram[rows, rows] = block
        _mirror_upper(self.gram, self.blocks)
        if not factored:  # not positive definite in floating point (tiny damping on a degenerate Gram)
            system = self.gram.clone()  # the one case beyond the memory bound: a second n x n matrix
            system.diagonal().add_(strength)
            rhs = torch.linalg.lstsq(system, rhs).solution
        return rhs.T.to(torch.float32, memory_format=torch.contiguous_format)  # one copy, not .float().contiguous()'s two

    def residual(self, weight: torch.Tensor) -> float:
        """||Z W^T - Y||^2 / ||Y||^2: the fit's objective on these windows, relative."""
        self._complete()
        energy = self.target_energy
        for rows in _blocks(weight.shape[0]):  # a block of W's rows at a time: w G w^T - 2 w C
            w = weight[rows].to(self.gram.dtype)
            energy += float(((w @ self.gram) * w).sum()) - 2 * float((w * self.cross[:, rows].T).sum())
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
        tried, best = [], None
        for strength in damping:
            weight = normal.solve(current, strength)
            runner.corrections[pair] = {"down_proj": weight}
            tried.append({"damping": strength, "heldout_loss": heldout.loss(pairs)})
            del runner.corrections[pair]
            if best is None or tried[-1]["heldout_loss"] < best["heldout_loss"]:  # only the best weight is kept
                best = {**tried[-1], "weight": weight}
            del weight
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
