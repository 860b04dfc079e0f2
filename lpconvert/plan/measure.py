"""Measuring pair sets on calibration text: the Calibrator, and build_calibrator that loads what it needs.

Measuring runs the source model layer by layer (runner.LayerRunner). Sets that share their first
pairs share the residual stream: a candidate that adds a pair at layer p re-runs layers p..L only.
torch is imported when a Calibrator is made, not with this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import LPError
from . import objectives
from .defaults import CACHE_LIMIT, OBJECTIVES, TOP_K, Progress


@dataclass
class Measured:
    pairs: tuple[int, ...]
    loss: float  # mean next-token NLL of the calibration text
    kl: float  # mean KL(source || paired) per position, top-k of the source + one bucket for the rest
    tokens: int
    split: str = "calib"
    values: dict[str, float] = field(default_factory=dict)  # every objective (objectives.OBJECTIVE_TABLE)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def value(self, objective: str) -> float:
        return self.values[objective] if objective in self.values else (self.kl if objective == "kl" else self.loss)

    def to_json(self) -> dict:
        shown = {"pairs": list(self.pairs), "loss": round(self.loss, 6), "perplexity": round(self.perplexity, 4),
                 "kl": round(self.kl, 6)}
        shown.update({name: round(v, 6) for name, v in self.values.items() if name not in shown and math.isfinite(v)})
        return shown


class Calibrator:
    """Measure pair sets of one model on fixed calibration windows (and their held-out split).

    Counts what it runs: `layer_windows` is the number of (layer, window) evaluations, so
    `forward_passes` is the cost in full-model forward passes over the calibration windows.

    The stream cache. The stream entering layer d depends only on the pairs below d, so a set that
    agrees with `base` below d can start at d from the base's stream there (its branch point: the
    first layer where the two differ). A search step measures sets that each add one pair to a base,
    and the next step's base is one of those sets; kept streams spare re-running the shared layers.
    What holds, before and after every call to `measure`:

    * `_streams[split]` is `(base, {d: [stream of batch 0, stream of batch 1, ...]})`: for each kept
      layer d, the input of layer d of every batch of `split`'s windows (in batch order; a layer's
      streams are kept for every batch or not at all), run with `base`'s pairs. d is a branch point inside the model (0 < d < num_layers).
    * `measure` takes its split's entry out (`_cached_streams`) and keeps only the layers d below
      which the old and the new base have the same pairs, and where no pair of the new base covers
      d - 1 and d (the stream between them does not exist): there the old streams are the new base's.
      While it walks it adds the streams at its own branch points, and it puts the entry back under
      the new base at the end. The other
      splits' entries are left as they are.
    * `_cache_bytes` is the size of the streams held (all splits), recounted from the tensors by
      `_cached_streams`; a stream is only added while the total stays within `cache_limit` (0: keep
      nothing). Lists dropped at the end of a call still count until that recount.

    Kept streams change no result: the same sets measure the same with `cache_limit = 0`.
    """

    def __init__(self, model, calib_ids, *, heldout_ids=None, objective: str = "kl", batch_size: int = 4,
                 provenance: dict | None = None, heldout_provenance: dict | None = None, top_k: int = TOP_K,
                 cache_limit: int = CACHE_LIMIT, progress: Progress = None):
        import torch

        from ..runner import LayerRunner

        if objective not in OBJECTIVES:
            raise LPError(f"--objective {objective} does not exist", f"use one of {', '.join(OBJECTIVES)}")
        if batch_size < 1:
            raise LPError(f"--batch-size must be at least 1, got {batch_size}", "e.g. --batch-size 4")
        self.torch = torch
        self.runner = LayerRunner(model, seq_len=calib_ids.shape[1])
        self.num_layers = self.runner.num_layers
        self.objective = objective
        self.batch_size = batch_size
        self.top_k = min(top_k, model.config.vocab_size)
        self.provenance = provenance or {}
        self.heldout_provenance = heldout_provenance
        self.progress = progress
        self.splits = {"calib": calib_ids}
        if heldout_ids is not None and heldout_ids.shape[0] > 0:
            self.splits["heldout"] = heldout_ids
        self.references: dict[str, list] = {}
        self.masks: dict[str, list] = {}  # per split and batch: the positions each objective averages over
        self.common = self._common_tokens(calib_ids, model.config.vocab_size)
        self.base: dict[str, Measured] = {}
        self.layer_windows = 0
        self.evaluations = 0  # pair sets measured on the calibration split
        self.heldout_evaluations = 0
        self.seconds = 0.0
        self._streams: dict[str, tuple[tuple[int, ...], dict[int, list]]] = {}  # see the class docstring
        self._cache_bytes = 0
        self.cache_limit = cache_limit
        self.config_hidden = model.config.hidden_size
        self.base["calib"] = self._reference("calib")

    # --- bookkeeping ---------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        return self.runner.seq_len

    def tokens(self, split: str = "calib") -> int:
        ids = self.splits.get(split)
        return 0 if ids is None else ids.numel()

    @property
    def has_heldout(self) -> bool:
        return "heldout" in self.splits

    @property
    def forward_passes(self) -> float:
        """Layers run, in full-model forward passes over the calibration windows."""
        return self.layer_windows / (self.num_layers * self.splits["calib"].shape[0])

    @property
    def tokens_processed(self) -> int:
        """Tokens run through the model, counted in full-model passes (all splits)."""
        return round(self.layer_windows * self.seq_len / self.num_layers)

    def cost(self) -> dict:
        return {"set_evaluations": self.evaluations, "heldout_evaluations": self.heldout_evaluations,
                "forward_passes": round(self.forward_passes, 2), "tokens_processed": self.tokens_processed,
                "calibration_tokens": self.tokens("calib"), "heldout_tokens": self.tokens("heldout"),
                "seconds": round(self.seconds, 1)}

    # --- running -------------------------------------------------------------------------------

    def _batches(self, split: str):
        ids = self.splits[split]
        for start in range(0, ids.shape[0], self.batch_size):
            yield start // self.batch_size, ids[start:start + self.batch_size]

    def _common_tokens(self, ids, vocab_size: int):
        """A bool mask over the vocabulary: the calibration text's commonest tokens (never copies)."""
        torch = self.torch
        counts = torch.bincount(ids.flatten(), minlength=vocab_size)
        common = torch.zeros(max(vocab_size, counts.numel()), dtype=torch.bool)
        distinct = int((counts > 0).sum())  # a short text keeps most of its tokens as copies
        common[counts.topk(min(objectives.COMMON_TOKENS, distinct // 10)).indices] = True
        return common

    def _reference(self, split: str) -> Measured:
        """Run the source once: its top-k next-token distribution for the KL, the positions each objective
        averages over, and the source's own values."""
        from ..runner import topk_reference

        torch = self.torch
        started = time.perf_counter()
        refs, masks, totals = [], [], {}
        with torch.inference_mode():
            windows = [ids for _, ids in self._batches(split)]
            finals = self.runner.run_all([self.runner.embed(ids) for ids in windows])  # layer-major: one read per layer
            self.layer_windows += self.num_layers * self.splits[split].shape[0]
            for ids, x in zip(windows, finals, strict=True):
                logp = self.runner.logprobs(x)[:, :-1]
                refs.append(topk_reference(logp, self.top_k))
                masks.append(objectives.position_masks(ids.to(logp.device), refs[-1], self.common.to(logp.device)))
                targets = ids.to(logp.device)[:, 1:]
                objectives.accumulate(totals, objectives.position_values(logp, targets, refs[-1]), masks[-1])
        values = objectives.means(totals)
        if not math.isfinite(values["loss"]):  # NaN weights or an overflow: every set would measure NaN, and rank nothing
            from ..runner import NotFinite, locate_nonfinite

            raise NotFinite(locate_nonfinite(self.runner, next(self._batches(split))[1]))
        self.references[split] = refs
        self.masks[split] = masks
        self.seconds += time.perf_counter() - started
        return Measured((), values["loss"], 0.0, totals["loss"][1], split, values)

    def _score(self, split: str, batch: int, x, ids, totals: dict) -> None:
        """Add one batch's per-objective sums and counts into totals."""
        logp = self.runner.logprobs(x)[:, :-1]
        targets = ids.to(logp.device)[:, 1:]
        reference = self.references[split][batch]
        objectives.accumulate(totals, objectives.position_values(logp, targets, reference), self.masks[split][batch])

    def measure(self, sets: Iterable[Iterable[int]], base: Iterable[int] = (), split: str = "calib"
                ) -> list[Measured]:
        """Measure each pair set; sets that agree with `base` below some layer restart from its stream there.

        The windows are walked once under `base`; a set whose first difference from `base` is the
        pair at layer d branches off at d (the input of layer d is the same for both) and runs
        layers d..L with its own pairs. The walk keeps the stream at each branch point, so the next
        call (a search step whose base is this base plus one pair at layer p) reuses every kept
        stream below p instead of running those layers again.
        """
        base = tuple(sorted(base))
        sets = [tuple(sorted(s)) for s in sets]
        if not sets:
            return []
        if split not in self.splits:
            raise ValueError(f"no {split} windows")
        if split not in self.references:
            self.base[split] = self._reference(split)
        started = time.perf_counter()
        branch = [self._branch_point(base, s) for s in sets]
        totals = [{} for _ in sets]  # per set: {objective: [sum, count]}
        walk = [(sets[i], branch[i], totals[i]) for i in sorted(range(len(sets)), key=lambda i: branch[i])]
        cached = self._cached_streams(split, base)
        with self.torch.inference_mode():
            self._walk(split, base, walk, cached)
        self._streams[split] = (base, cached)
        if split == "calib":
            self.evaluations += len(sets)
        else:
            self.heldout_evaluations += len(sets)
        self.seconds += time.perf_counter() - started
        results = []
        for pairs, total in zip(sets, totals, strict=True):
            values = objectives.means(total)
            results.append(Measured(pairs, values["loss"], values["kl"], total["loss"][1], split, values))
            if not (math.isfinite(values["loss"]) and math.isfinite(values["kl"])):  # the source measured finite: these pairs broke it
                shown = ", ".join(f"({p}, {p + 1})" for p in pairs)
                raise LPError(f"plan measured NaN or Inf with the pairs {shown} run in parallel: they cannot be "
                              "ranked", "exclude those pairs, or measure in float32 (--dtype float32)")
        return results

    def _walk(self, split: str, base: tuple[int, ...], walk: list, cached: dict[int, list]) -> None:
        """Run every batch under `base` from the embedding up, branching off each set (by branch point) on the way.

        Layer-major: every batch goes through a layer before the next layer runs (LayerRunner.run_all), so a streamed
        model reads each layer once per set rather than once per set and batch. Per batch, the same operations as
        a batch at a time: the same results."""
        windows = [ids for _, ids in self._batches(split)]
        n = self.splits[split].shape[0]
        xs, at = [self.runner.embed(ids) for ids in windows], 0
        for pairs, d, total in walk:
            if d > at:
                xs, at = self._base_streams(xs, at, d, base, cached, n), d
            self._keep_streams(cached, d, xs)
            ys = self.runner.run_all(xs, start=d, pairs=pairs) if d < self.num_layers else xs
            self.layer_windows += (self.num_layers - d) * n
            for b, (y, ids) in enumerate(zip(ys, windows, strict=True)):
                self._score(split, b, y, ids, total)

    def _base_streams(self, xs: list, at: int, d: int, base: tuple[int, ...], cached: dict[int, list], n: int) -> list:
        """Every batch's stream at the input of layer d under `base`, from `xs` at layer `at` (below d).

        Starts from the highest kept layer above `at` and not above d, then runs the base's layers that are left.
        """
        reusable = [c for c in cached if at < c <= d]
        if reusable:
            at = max(reusable)
            xs = list(cached[at])
        if d > at:
            xs = self.runner.run_all(xs, start=at, pairs=base, stop=d)
            self.layer_windows += (d - at) * n
        return xs

    def _keep_streams(self, cached: dict[int, list], d: int, xs: list) -> None:
        """Keep every batch's stream at branch point d, while the cache has room for all of them (a layer's
        streams are kept whole or not at all)."""
        if not 0 < d < self.num_layers or d in cached:
            return
        size = sum(x.numel() for x in xs) * self.runner.dtype.itemsize
        if self._cache_bytes + size <= self.cache_limit:
            cached[d] = list(xs)
            self._cache_bytes += size

    def _cached_streams(self, split: str, base: tuple[int, ...]) -> dict[int, list]:
        """Kept streams of `split` that are also the streams of `base`: layers below which both agree."""
        old_base, streams = self._streams.pop(split, ((), {}))
        kept = {}
        for layer, xs in streams.items():
            below_old = {p for p in old_base if p < layer}
            below_new = {p for p in base if p < layer}
            if below_old == below_new and layer - 1 not in below_new:
                kept[layer] = xs
        itemsize = self.runner.dtype.itemsize
        self._cache_bytes = sum(x.numel() * itemsize for other in self._streams.values()
                                for xs in other[1].values() for x in xs)
        self._cache_bytes += sum(x.numel() * itemsize for xs in kept.values() for x in xs)
        return kept

    def _branch_point(self, base: tuple[int, ...], pairs: tuple[int, ...]) -> int:
        diff = set(base) ^ set(pairs)
        return min(diff) if diff else self.num_layers
