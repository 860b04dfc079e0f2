"""distill: a short fine-tune of the pairs' projections toward the source's next-token distribution.

Starts where lsq left the pairs (its accepted corrections, else the pairs' own weights) and trains
every pair's fused projections as the export writes them (train "all": qkv_proj and gate_up_proj with
the norms folded in, o_proj and down_proj; "output": o_proj and down_proj only) with Adam
(cosine-decayed learning rate) on KL(source || healed) over the calibration windows, one window per
step. Only those tensors are trained; the rest of the model is the source's, frozen and shared, never
copied. Training the input projections too recovers more (docs/quality.md, "Choices measured"). The source's
distribution is kept as its top-k log-probabilities and one bucket for the rest (runner.topk_reference).
The held-out loss is measured every `eval_every` steps and the best weights seen (the starting
ones included) are kept: a fine-tune that does not help the held-out windows changes nothing.
"""

from __future__ import annotations

import time

import torch

from ..runner import INPUT_PROJECTIONS, LayerRunner, kl_to_reference, topk_reference
from .streams import Progress, Streams

TOP_K = 64
TRAINED = {"all": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "output": ("o_proj", "down_proj")}


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


class _TrainedPair:
    """One pair's trained tensors, and its fused projections (runner.corrections) built from them.

    An output projection is trained as the fused [a | b] tensor itself. An input projection (qkv_proj,
    gate_up_proj) is trained as what it is made of, each layer's own weights and its norm weight,
    and folded into the fused tensor before every forward pass: a norm weight scales a whole column of
    q, k and v at once, a direction Adam's per-element steps on the folded product do not find in a
    short fine-tune (measured on SmolLM2 at 25 blocks: 56% of the held-out gap after 25 steps, against
    47% training the folded product; docs/quality.md, "Choices measured").
    """

    def __init__(self, runner: LayerRunner, pair: int, names: tuple[str, ...]):
        self.pair = pair
        self.fixed: dict[str, torch.Tensor] = {}  # trained as they are
        self.factored: dict[str, tuple[list, dict]] = {}  # name -> ([(weight, layer)] in row order, {layer: norm})
        fitted = runner.corrections.setdefault(pair, {})
        for name in names:
            if name in INPUT_PROJECTIONS and name not in fitted:
                self.factored[name] = _factors(runner, pair, name)
            else:
                weight = fitted[name] if name in fitted else runner.projection(pair, name)[0]
                self.fixed[name] = weight.detach().float().clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        factors = [t for blocks, norms in self.factored.values() for t in [w for w, _ in blocks] + list(norms.values())]
        return [*self.fixed.values(), *factors]

    def fused(self) -> dict[str, torch.Tensor]:
        folded = {name: torch.cat([weight * norms[layer][None, :] for weight, layer in blocks])
                  for name, (blocks, norms) in self.factored.items()}
        return {**self.fixed, **folded}


def _factors(runner: LayerRunner, pair: int, name: str) -> tuple[list, dict]:
    """Trainable float32 copies of what a fused input projection is made of (runner.input_parts)."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().clone().requires_grad_(True)

    blocks, norms = runner.input_parts(pair, name)
    return [(leaf(w), half) for w, half in blocks], {half: leaf(n) for half, n in norms.items()}


def _use(runner: LayerRunner, trained: list[_TrainedPair]) -> None:
    for t in trained:
        runner.corrections[t.pair].update(t.fused())


def _snapshot(runner: LayerRunner, pairs: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {p: {name: w.detach().clone() for name, w in runner.corrections[p].items()} for p in pairs}


def heal_distill(runner: LayerRunner, pairs: list[int], calib_batches: list[torch.Tensor], heldout: Streams, *,
                 steps: int, lr: float, seed: int, train: str = "all", eval_every: int = 25,
                 progress: Progress = None) -> dict:
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
    trained = [_TrainedPair(runner, pair, TRAINED[train]) for pair in pairs]
    best_loss, best, start_loss = None, None, None
    optimizer = torch.optim.Adam([p for t in trained for p in t.parameters()], lr=lr)
    # one window per step is a noisy gradient: a cosine decay lets the last steps settle
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    trace = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                _use(runner, trained)
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
        _use(runner, trained)  # fold the trained factors again: the graph of this step starts here
        logp = runner.logprobs(runner.run(inputs[k], start=first, pairs=pairs))[:, :-1]
        kl = kl_to_reference(references[k], logp).mean()
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        optimizer.step()
        schedule.step()
    runner.corrections.clear()
    runner.corrections.update(best)
    return {"steps": steps, "lr": lr, "train": list(TRAINED[train]), "eval_every": eval_every, "top_k": TOP_K,
            "heldout_loss_before": round(start_loss, 6), "heldout_loss_after": round(best_loss, 6),
            "best_step": min(trace, key=lambda t: t["heldout_loss"])["step"], "trace": trace,
            "seconds": round(time.perf_counter() - started, 1)}
