"""distill: a short fine-tune of the pairs' output projections toward the source's next-token distribution.

Starts where lsq left the pairs (its accepted corrections, else the pairs' own weights) and trains
every pair's fused o_proj and down_proj, [a | b] as the export writes them, with Adam (cosine-decayed
learning rate) on KL(source || healed) over the calibration windows, one window per step. Only those tensors are
trained; the rest of the model is the source's, frozen and shared, never copied. The source's
distribution is kept as its top-k log-probabilities and one bucket for the rest (runner.topk_reference).
The held-out loss is measured every `eval_every` steps and the best weights seen (the starting
ones included) are kept: a fine-tune that does not help the held-out windows changes nothing.
"""

from __future__ import annotations

import time

import torch

from ..runner import LayerRunner, kl_to_reference, topk_reference
from .streams import Progress, Streams

TOP_K = 64
PROJECTIONS = ("o_proj", "down_proj")


def _teacher(runner: LayerRunner, batches: list[torch.Tensor], first: int) -> tuple[list[torch.Tensor], list[tuple]]:
    """Each window's stream at the first pair's input (shared by source and healed model) and the
    source's top-k next-token distribution."""
    inputs, references = [], []
    with torch.no_grad():
        for ids in batches:
            start = runner.run(runner.embed(ids), stop=first)
            logp = runner.logprobs(runner.run(start, start=first))[:, :-1]
            for row in range(ids.shape[0]):
                inputs.append(start[row:row + 1])
                references.append(tuple(t[row:row + 1] for t in topk_reference(logp[row:row + 1], TOP_K)))
    return inputs, references


def _parameters(runner: LayerRunner, pairs: list[int]) -> list[torch.Tensor]:
    params = []
    for pair in pairs:
        fitted = runner.corrections.setdefault(pair, {})
        for name in PROJECTIONS:
            weight = fitted.get(name)
            if weight is None:
                weight = runner.projection(pair, name)[0]
            fitted[name] = weight.detach().float().clone().requires_grad_(True)
            params.append(fitted[name])
    return params


def _snapshot(runner: LayerRunner, pairs: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {p: {name: w.detach().clone() for name, w in runner.corrections[p].items()} for p in pairs}


def heal_distill(runner: LayerRunner, pairs: list[int], calib_batches: list[torch.Tensor], heldout: Streams, *,
                 steps: int, lr: float, seed: int, eval_every: int = 25, progress: Progress = None) -> dict:
    """Fine-tune in place (runner.corrections ends holding the best weights seen); returns the report.

    `heldout` must be at a layer at or below the first pair (fresh streams are at the embedding).
    """
    started = time.perf_counter()
    pairs = sorted(pairs)
    first = pairs[0]
    if progress:
        progress(f"distill: the source's distribution on {sum(b.numel() for b in calib_batches)} tokens")
    inputs, references = _teacher(runner, calib_batches, first)
    heldout.advance(first)  # below the first pair healed and source streams are the same
    runner.model.requires_grad_(False)
    params = _parameters(runner, pairs)
    best_loss, best, start_loss = None, None, None
    optimizer = torch.optim.Adam(params, lr=lr)
    # one window per step is a noisy gradient: a cosine decay lets the last steps settle
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    trace = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            loss = heldout.loss(pairs)
            trace.append({"step": step, "heldout_loss": round(loss, 6)})
            start_loss = loss if start_loss is None else start_loss
            if best_loss is None or loss < best_loss:
                best_loss, best = loss, _snapshot(runner, pairs)
            if progress:
                progress(f"distill: step {step}/{steps}, held-out perplexity {torch.tensor(loss).exp():.2f}")
        if step == steps:
            break
        k = int(order[step % len(order)])
        logp = runner.logprobs(runner.run(inputs[k], start=first, pairs=pairs))[:, :-1]
        kl = kl_to_reference(references[k], logp).mean()
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        optimizer.step()
        schedule.step()
    runner.corrections.clear()
    runner.corrections.update(best)
    return {"steps": steps, "lr": lr, "eval_every": eval_every, "top_k": TOP_K,
            "heldout_loss_before": round(start_loss, 6), "heldout_loss_after": round(best_loss, 6),
            "best_step": min(trace, key=lambda t: t["heldout_loss"])["step"], "trace": trace,
            "seconds": round(time.perf_counter() - started, 1)}
