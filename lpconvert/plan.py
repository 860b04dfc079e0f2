"""Plan: decide which consecutive layers to pair, for a target depth, speedup or loss budget.

Three strategies:

* ``contiguous`` -- the paper's rule: one contiguous run of pairs (s, s+1), (s+2, s+3), ...; s is
  chosen by a per-pair metric summed over the run, or, with the model, by measuring every run
  (the paper's perplexity sweep).
* ``greedy`` -- the best non-overlapping pairs by a per-pair metric of the scores file.
* ``search`` -- grows the set pair by pair, measuring the model with ALL chosen pairs applied at
  every step (pairs interact), among a pool of candidates pre-ranked by the scores. Each step's
  front-runners are re-measured on the calibration text's held-out split before one is trusted.

Measuring runs the source model layer by layer (runner.LayerRunner). Sets that share their first
pairs share the residual stream: a candidate that adds a pair at layer p re-runs layers p..L only.

The search objective defaults to the KL divergence of the paired model's next-token distribution
from the source model's on the calibration text: it asks "how much did the model change?" at every
position and over the whole vocabulary, where the NLL of the text only asks "does it still predict
these tokens?", which a change can improve by chance on a small sample (METHOD.md section 3: choosing
by calibration loss alone overfits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import LPError
from .formats import PAIR_METRICS, Plan, parse_percent, validate_pairs

# Cost model for the speedup estimate: decode time per token is proportional to L - ALPHA * pairs,
# i.e. each pair saves ALPHA of one layer's time. Fitted to METHOD.md section 3's H200 measurement of
# the Llama-2-7B shape (bf16, CUDA graph, batch 1): 6.58 ms at 0 pairs, 5.19 ms at 12 pairs of 32
# layers -> (1 - 5.19/6.58) * 32 / 12 = 0.56. The other measured shapes span 0.47 (Llama-3-8B) to
# 0.86 (Qwen2.5-0.5B): speedups derived from it are ESTIMATES, not measurements.
ALPHA = 0.55
SPEEDUP_NOTE = (f"estimate from a cost model (decode time ∝ L − {ALPHA}·pairs, fitted to H200 decode "
                "measurements of a Llama-2-7B shape), not a measurement")

STRATEGIES = ("contiguous", "greedy", "search")
STRATEGY_COLORS = {"contiguous": "tab:blue", "greedy": "tab:orange", "search": "tab:green"}  # in every plot
OBJECTIVES = ("kl", "loss")
DEFAULT_CANDIDATES = 8
DEFAULT_BEAM = 2
DEFAULT_VERIFY = 3  # front-runners re-measured on held-out text at each search step
DEFAULT_TOKENS = 4096  # calibration tokens every candidate set is measured on
DEFAULT_HELDOUT_TOKENS = 8192  # held-out tokens the front-runners are re-measured on
CACHE_LIMIT = 2 * 1024**3  # bytes of residual streams kept between search steps
TOP_K = 256  # source tokens kept per position for the KL (the rest of the vocabulary is one bucket)

Progress = Callable[[str], None] | None


# ----------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Target:
    kind: str  # pairs | depth | speedup | max_loss_increase
    value: float

    def to_json(self) -> dict:
        value = int(self.value) if self.kind in ("pairs", "depth") else self.value
        return {"kind": self.kind, "value": value}

    def describe(self) -> str:
        if self.kind == "pairs":
            return f"{int(self.value)} pairs"
        if self.kind == "depth":
            return f"effective depth {int(self.value)}"
        if self.kind == "speedup":
            return f"estimated speedup ≥ {self.value:g}x"
        return f"calibration loss within {100 * self.value:g}% of the source's"


def parse_target(pairs: int | None = None, depth: int | None = None, speedup: float | None = None,
                 max_loss_increase: str | float | None = None) -> Target:
    given = [name for name, value in (("--pairs", pairs), ("--depth", depth), ("--speedup", speedup),
                                      ("--max-loss-increase", max_loss_increase)) if value is not None]
    if len(given) != 1:
        which = f"got {', '.join(given)}" if given else "got none"
        raise LPError(f"give exactly one target: --pairs, --depth, --speedup or --max-loss-increase ({which})",
                      "e.g. --depth 25 or --speedup 1.1")
    if pairs is not None:
        if pairs < 1:
            raise LPError(f"--pairs must be at least 1, got {pairs}", "e.g. --pairs 4")
        return Target("pairs", pairs)
    if depth is not None:
        return Target("depth", depth)
    if speedup is not None:
        if not math.isfinite(speedup) or speedup <= 1:
            raise LPError(f"--speedup must be above 1, got {speedup:g}", "e.g. --speedup 1.1")
        return Target("speedup", float(speedup))
    value = parse_percent(max_loss_increase, "--max-loss-increase") if isinstance(max_loss_increase, str) \
        else float(max_loss_increase)
    if not math.isfinite(value) or value <= 0:
        raise LPError("--max-loss-increase must be positive", "e.g. --max-loss-increase 5%")
    return Target("max_loss_increase", value)


def allowed_range(num_layers: int, allow_edge_layers: bool) -> tuple[int, int]:
    """First and last layer that may be in a pair."""
    return (0, num_layers - 1) if allow_edge_layers else (1, num_layers - 2)


def candidate_starts(num_layers: int, allow_edge_layers: bool) -> list[int]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return list(range(lo, hi))


def max_pairs(num_layers: int, allow_edge_layers: bool) -> int:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return max(0, (hi - lo + 1) // 2)


def estimated_speedup(num_layers: int, num_pairs: int) -> float:
    return num_layers / (num_layers - ALPHA * num_pairs)


def pairs_for_target(target: Target, num_layers: int, allow_edge_layers: bool) -> int | None:
    """Number of pairs a target asks for (None for a loss budget); LPError if it cannot fit."""
    most = max_pairs(num_layers, allow_edge_layers)
    where = "" if allow_edge_layers else ", first and last layers excluded"
    fix = "ask for fewer" + ("" if allow_edge_layers else " or pass --allow-edge-layers")
    if target.kind == "max_loss_increase":
        if most == 0:
            raise LPError(f"no pair fits in a model of {num_layers} layers{where}", fix)
        return None
    if target.kind == "pairs":
        k = int(target.value)
        if k > most:
            raise LPError(f"--pairs {k} does not fit: at most {most} non-overlapping pairs fit in a model of "
                          f"{num_layers} layers{where}", fix)
        return k
    if target.kind == "depth":
        d = int(target.value)
        if d >= num_layers:
            raise LPError(f"--depth {d} is not below the model's {num_layers} layers", f"use --depth {num_layers - 1} "
                          "or less")
        if num_layers - d > most:
            raise LPError(f"--depth {d} needs {num_layers - d} pairs, but at most {most} non-overlapping pairs fit "
                          f"in a model of {num_layers} layers{where} (depth {num_layers - most} at least)", fix)
        return num_layers - d
    s = target.value
    k = math.ceil(round(num_layers * (1 - 1 / s) / ALPHA, 9))
    if k > most:
        best = estimated_speedup(num_layers, most)
        raise LPError(f"--speedup {s:g} needs {k} pairs by the cost model, but at most {most} non-overlapping pairs "
                      f"fit in a model of {num_layers} layers{where} (estimated {best:.2f}x)", fix)
    return max(1, k)


# ----------------------------------------------------------------------------------------------
# Scores and per-pair metrics


# Ranking metrics in order of preference: measured loss first, then the cheap metric whose ranking
# agreed best with it on SmolLM2 (Spearman, middle pairs: pair_cosine +0.36, angular_distance +0.20,
# pair_rel_l2 -0.09; docs/benchmarks.md).
METRIC_PREFERENCE = ("loss_increase", "pair_cosine", "angular_distance", "pair_rel_l2")


def default_metric(scores: dict) -> str:
    pairs = scores.get("pairs") or []
    for metric in METRIC_PREFERENCE:
        if pairs and all(isinstance(p.get(metric), (int, float)) for p in pairs):
            return metric
    return METRIC_PREFERENCE[-1]


def pair_values(scores: dict, metric: str, path: str = "the scores") -> dict[int, float]:
    """{first layer: value} of one per-pair metric, oriented so that LOWER is safer to pair."""
    if metric not in PAIR_METRICS:
        raise LPError(f"--metric {metric} is not a per-pair metric", f"use one of {', '.join(PAIR_METRICS)}")
    sign = 1.0 if PAIR_METRICS[metric] == "low" else -1.0
    values = {}
    for entry in scores.get("pairs") or []:
        value = entry.get(metric) if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[int(entry["first"])] = sign * float(value)
    if not values:
        hint = ("re-run `lpconvert score` with --measure-loss" if metric == "loss_increase"
                else "re-run `lpconvert score`")
        raise LPError(f"{path} have no '{metric}' values for pairs", f"{hint}, or choose another --metric")
    return values


def rank_pairs(values: dict[int, float], allowed: Iterable[int]) -> list[int]:
    """Allowed pair starts, safest first (ties: lower layer first); unscored pairs are ranked last."""
    allowed = list(allowed)
    scored = sorted((p for p in allowed if p in values), key=lambda p: (values[p], p))
    return scored + [p for p in allowed if p not in values]


def compatible(pairs: Iterable[int], p: int) -> bool:
    return all(abs(p - q) >= 2 for q in pairs)


def contiguous_runs(k: int, num_layers: int, allow_edge_layers: bool) -> list[tuple[int, ...]]:
    lo, hi = allowed_range(num_layers, allow_edge_layers)
    return [tuple(range(s, s + 2 * k, 2)) for s in range(lo, hi - 2 * k + 2)]


# ----------------------------------------------------------------------------------------------
# Measuring pair sets on calibration text


@dataclass
class Measured:
    pairs: tuple[int, ...]
    loss: float  # mean next-token NLL of the calibration text
    kl: float  # mean KL(source || paired) per position, top-k of the source + one bucket for the rest
    tokens: int
    split: str = "calib"

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def value(self, objective: str) -> float:
        return self.kl if objective == "kl" else self.loss

    def to_json(self) -> dict:
        return {"pairs": list(self.pairs), "loss": round(self.loss, 6), "perplexity": round(self.perplexity, 4),
                "kl": round(self.kl, 6)}


class Calibrator:
    """Measure pair sets of one model on fixed calibration windows (and their held-out split).

    Counts what it runs: `layer_windows` is the number of (layer, window) evaluations, so
    `forward_passes` is the cost in full-model forward passes over the calibration windows.
    """

    def __init__(self, model, calib_ids, *, heldout_ids=None, objective: str = "kl", batch_size: int = 4,
                 provenance: dict | None = None, heldout_provenance: dict | None = None, top_k: int = TOP_K,
                 cache_limit: int = CACHE_LIMIT, progress: Progress = None):
        import torch

        from .runner import LayerRunner

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
        self.base: dict[str, Measured] = {}
        self.layer_windows = 0
        self.evaluations = 0  # pair sets measured on the calibration split
        self.heldout_evaluations = 0
        self.seconds = 0.0
        # Streams kept between calls, per split: (the base they belong to, {layer: [stream per batch]}).
        self._streams: dict[str, tuple[tuple[int, ...], dict[int, list]]] = {}
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

    def _reference(self, split: str) -> Measured:
        """Run the source once: its loss, and its top-k next-token distribution for the KL."""
        torch = self.torch
        started = time.perf_counter()
        refs, nll, count = [], 0.0, 0
        with torch.inference_mode():
            for _, ids in self._batches(split):
                x = self.runner.run(self.runner.embed(ids))
                self.layer_windows += self.num_layers * ids.shape[0]
                logp = self.runner.logprobs(x)[:, :-1]
                targets = ids.to(logp.device)[:, 1:, None]
                nll += float(-logp.gather(-1, targets).double().sum())
                count += targets.numel()
                top, idx = logp.topk(self.top_k, dim=-1)
                rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top, dim=-1)), min=1e-12))
                refs.append((idx, top, top.exp(), rest, rest.exp()))
        self.references[split] = refs
        self.seconds += time.perf_counter() - started
        return Measured((), nll / count, 0.0, count, split)

    def _score(self, split: str, batch: int, x, ids) -> tuple[float, float, int]:
        torch = self.torch
        idx, ref_top, ref_p, ref_rest, ref_rest_p = self.references[split][batch]
        logp = self.runner.logprobs(x)[:, :-1]
        targets = ids.to(logp.device)[:, 1:, None]
        nll = float(-logp.gather(-1, targets).double().sum())
        top = logp.gather(-1, idx)
        rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top, dim=-1)), min=1e-12))
        kl = (ref_p * (ref_top - top)).sum(-1) + ref_rest_p * (ref_rest - rest)
        return nll, float(kl.double().sum()), targets.numel()

    def measure(self, sets: Iterable[Iterable[int]], base: Iterable[int] = (), split: str = "calib"
                ) -> list[Measured]:
        """Measure each pair set; sets that agree with `base` below some layer restart from its stream there.

        The windows are walked once under `base`; a set whose first difference from `base` is the
        pair at layer d branches off at d (the input of layer d is the same for both) and runs
        layers d..L with its own pairs. The walk keeps the stream at each branch point, so the next
        call (a search step whose base is this base plus one pair at layer p) reuses every kept
        stream below p instead of running those layers again.
        """
        torch = self.torch
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
        order = sorted(range(len(sets)), key=lambda i: branch[i])
        totals = [[0.0, 0.0, 0] for _ in sets]
        cached = self._cached_streams(split, base)
        window_bytes = self.seq_len * self.config_hidden * self.runner.dtype.itemsize
        with torch.inference_mode():
            for b, ids in self._batches(split):
                n = ids.shape[0]
                x, at = self.runner.embed(ids), 0
                for i in order:
                    d = branch[i]
                    if d > at:
                        reusable = [c for c in cached if at < c <= d and len(cached[c]) > b]
                        if reusable:
                            at = max(reusable)
                            x = cached[at][b]
                        if d > at:
                            x = self.runner.run(x, start=at, pairs=base, stop=d)
                            self.layer_windows += (d - at) * n
                            at = d
                    if 0 < d < self.num_layers and (d not in cached or len(cached[d]) <= b):
                        if self._cache_bytes + n * window_bytes <= self.cache_limit:
                            cached.setdefault(d, []).append(x)
                            self._cache_bytes += n * window_bytes
                    y = self.runner.run(x, start=d, pairs=sets[i]) if d < self.num_layers else x
                    self.layer_windows += (self.num_layers - d) * n
                    nll, kl, count = self._score(split, b, y, ids)
                    totals[i][0] += nll
                    totals[i][1] += kl
                    totals[i][2] += count
        n_batches = -(-self.splits[split].shape[0] // self.batch_size)
        self._streams[split] = (base, {c: xs for c, xs in cached.items() if len(xs) == n_batches})
        if split == "calib":
            self.evaluations += len(sets)
        else:
            self.heldout_evaluations += len(sets)
        self.seconds += time.perf_counter() - started
        return [Measured(s, t[0] / t[2], t[1] / t[2], t[2], split) for s, t in zip(sets, totals, strict=True)]

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


def build_calibrator(source, *, calib: str = "wiki", tokens: int = DEFAULT_TOKENS, seq_len: int = 512,
                     seed: int = 0, heldout_tokens: int = DEFAULT_HELDOUT_TOKENS, objective: str = "kl", batch_size: int = 4,
                     device: str = "auto", dtype: str = "auto", progress: Progress = None) -> Calibrator:
    """Load the model and tokenise calibration windows (and held-out windows of the same text)."""

    from .runtime import compute_dtype, dtype_name, resolve_device, text_windows
    from .texts import tokenize_windows

    device = resolve_device(device)
    torch_dtype = compute_dtype(dtype, device)
    if tokens < seq_len:
        raise LPError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}",
                      f"use --tokens {seq_len} or more")
    if 0 < heldout_tokens < seq_len:
        raise LPError(f"--heldout-tokens {heldout_tokens} is less than one window of --seq-len {seq_len}",
                      f"use --heldout-tokens {seq_len} or more, or 0 to switch the held-out check off")
    if progress:
        progress(f"tokenising the calibration text {calib}")
    tokenizer = source.load_tokenizer()
    text, windows = text_windows(tokenizer, calib, tokens=tokens, seq_len=seq_len, seed=seed, split="calib",
                                 also_tokens=heldout_tokens)
    heldout = None
    if heldout_tokens > 0:
        try:
            heldout = tokenize_windows(tokenizer, text, seq_len=seq_len, num_tokens=heldout_tokens, seed=seed,
                                       split="heldout")
        except LPError:
            heldout = None  # text too short for a held-out split: plan without the check, and say so
    vocab = source.config.vocab_size
    if int(windows.input_ids.max()) >= vocab:
        raise LPError(f"the tokenizer of {source.name} produces ids beyond the model's vocabulary ({vocab})",
                      "use the model's own tokenizer files")
    if progress:
        progress(f"loading {source.name} ({dtype_name(torch_dtype)} on {device})")
    model = source.load_model(dtype=torch_dtype, device=device)
    if progress:
        progress(f"measuring the source on {windows.provenance['tokens']} calibration tokens")
    return Calibrator(model, windows.input_ids, heldout_ids=None if heldout is None else heldout.input_ids,
                      objective=objective, batch_size=batch_size, provenance=windows.provenance,
                      heldout_provenance=None if heldout is None else heldout.provenance, progress=progress)


# ----------------------------------------------------------------------------------------------
# Strategies


@dataclass
class Choice:
    """What a strategy chose, with what it measured and how."""

    pairs: list[int]
    measured: Measured | None = None
    heldout: Measured | None = None
    predicted_loss_increase: float | None = None  # sum of single-pair loss increases (an estimate)
    trace: list[dict] = field(default_factory=list)
    front: list[dict] = field(default_factory=list)  # [{depth, perplexity, measured}] along the way


def _loss_increase_values(scores: dict) -> dict[int, float] | None:
    try:
        return pair_values(scores, "loss_increase")
    except LPError:
        return None


def _summed_increase(pairs: Iterable[int], increases: dict[int, float] | None) -> float | None:
    if increases is None:
        return None
    pairs = list(pairs)
    if any(p not in increases for p in pairs):
        return None
    return sum(increases[p] for p in pairs)


def _need_loss_increase(increases, strategy: str) -> dict[int, float]:
    if increases is None:
        raise LPError(f"--max-loss-increase with --strategy {strategy} needs measured losses: scores with per-pair "
                      "'loss_increase' (lpconvert score --measure-loss) or --model",
                      "re-run the scores with loss, or pass --model")
    return increases


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


def _greedy_pick(ranking: list[int], k: int | None, num_layers: int, allow_edge_layers: bool) -> list[int]:
    chosen: list[int] = []
    for p in ranking:
        if k is not None and len(chosen) == k:
            break
        if compatible(chosen, p) and keeps_target_reachable(chosen, p, k, num_layers, allow_edge_layers):
            chosen.append(p)
    return sorted(chosen)


def plan_greedy(values: dict[int, float], k: int | None, *, num_layers: int, allow_edge_layers: bool,
                increases=None, loss_budget: float | None = None) -> Choice:
    """The best pairs by the metric that do not overlap (and leave room for k in all).

    With a loss budget: the largest greedy set whose summed single-pair loss increases fit in it.
    """
    ranking = rank_pairs(values, candidate_starts(num_layers, allow_edge_layers))
    if loss_budget is None:
        chosen = _greedy_pick(ranking, k, num_layers, allow_edge_layers)
        return Choice(chosen, predicted_loss_increase=_summed_increase(chosen, increases))
    for size in range(max_pairs(num_layers, allow_edge_layers), 0, -1):
        chosen = _greedy_pick(ranking, size, num_layers, allow_edge_layers)
        total = _summed_increase(chosen, increases)
        if len(chosen) == size and total is not None and total <= loss_budget:
            return Choice(chosen, predicted_loss_increase=total)
    return Choice([])


def plan_contiguous(values: dict[int, float], k: int | None, *, num_layers: int, allow_edge_layers: bool,
                    increases=None, loss_budget: float | None = None, calibrator: Calibrator | None = None,
                    objective: str = "loss", progress: Progress = None) -> Choice:
    """One contiguous run of pairs; by measured calibration objective when a calibrator is given."""
    trace, front = [], []
    sizes = [k] if k is not None else range(1, max_pairs(num_layers, allow_edge_layers) + 1)
    best_choice: Choice | None = None
    for size in sizes:
        runs = contiguous_runs(size, num_layers, allow_edge_layers)
        if not runs:
            break
        if calibrator is not None:
            if progress:
                progress(f"contiguous: measuring {len(runs)} runs of {size} pairs")
            results = calibrator.measure(runs)
            trace.append({"pairs": size, "evaluated": [r.to_json() for r in results]})
            if loss_budget is not None:
                base = calibrator.base["calib"].loss
                results = [r for r in results if r.loss <= base * (1 + loss_budget)]
            if not results:
                break
            best = min(results, key=lambda r: (r.value(objective), r.pairs))
            front.append({"depth": num_layers - size, "perplexity": best.perplexity, "measured": True})
            best_choice = Choice(list(best.pairs), measured=best,
                                 predicted_loss_increase=_summed_increase(best.pairs, increases))
        else:
            def summed(run):
                return sum(values.get(p, math.inf) for p in run)

            if loss_budget is not None:
                runs = [r for r in runs if _summed_increase(r, increases) is not None
                        and _summed_increase(r, increases) <= loss_budget]
                if not runs:
                    break
            best_run = min(runs, key=lambda r: (summed(r), r))
            best_choice = Choice(list(best_run), predicted_loss_increase=_summed_increase(best_run, increases))
    if best_choice is None:
        best_choice = Choice([])
    best_choice.trace, best_choice.front = trace, front
    return best_choice


def plan_search(calibrator: Calibrator, ranking: list[int], k: int | None, *, num_layers: int,
                allow_edge_layers: bool, candidates: int = DEFAULT_CANDIDATES, beam: int = DEFAULT_BEAM,
                verify: int = DEFAULT_VERIFY, loss_budget: float | None = None, progress: Progress = None) -> Choice:
    """Grow the set pair by pair, measuring the model with all chosen pairs applied.

    At each step every pool candidate compatible with each beam set is measured on the calibration
    windows (branching off the beam set's stream at the candidate's layer). When held-out windows
    exist, the `verify` best expansions are also measured there, and the beam keeps the best by the
    token-weighted mean of both measurements (the held-out text guards against a choice that only
    fits the calibration sample).
    """
    if candidates < 1:
        raise LPError(f"--candidates must be at least 1, got {candidates}", "e.g. --candidates 10")
    if beam < 1:
        raise LPError(f"--beam must be at least 1, got {beam}", "e.g. --beam 2")
    objective = calibrator.objective
    most = max_pairs(num_layers, allow_edge_layers)
    goal = k if k is not None else most
    pool = ranking[:candidates]
    base = calibrator.base["calib"]
    limit = None if loss_budget is None else base.loss * (1 + loss_budget)
    use_heldout = calibrator.has_heldout and verify > 0
    w_cal = calibrator.tokens("calib")
    w_held = calibrator.tokens("heldout") if use_heldout else 0

    def combined(m: Measured, h: Measured | None) -> float:
        if h is None:
            return m.value(objective)
        return (m.value(objective) * w_cal + h.value(objective) * w_held) / (w_cal + w_held)

    beam_sets: list[tuple[int, ...]] = [()]
    chosen_m: Measured | None = None
    chosen_h: Measured | None = None
    trace, front = [], []
    for step in range(1, goal + 1):
        expansions: dict[tuple[int, ...], Measured] = {}
        for current in beam_sets:
            def fits(p, current=current):
                return compatible(current, p) and keeps_target_reachable(current, p, k, num_layers,
                                                                         allow_edge_layers)

            options = [p for p in pool if fits(p)]
            if not options:  # the pool is used up: take the next-ranked pairs that still fit
                options = [p for p in ranking if fits(p)][:max(1, candidates // 2)]
            new = [tuple(sorted((*current, p))) for p in options]
            new = [s for s in dict.fromkeys(new) if s not in expansions]
            if progress:
                progress(f"search step {step}/{goal}: measuring {len(new)} sets of {step} pairs")
            for m in calibrator.measure(new, base=current):
                expansions[m.pairs] = m
        if not expansions:
            break
        ranked = sorted(expansions.values(), key=lambda m: (m.value(objective), m.pairs))
        if limit is not None:
            ranked = [m for m in ranked if m.loss <= limit]
            if not ranked:
                break
        held: dict[tuple[int, ...], Measured] = {}
        if use_heldout:
            finalists = ranked[:max(verify, beam)]
            if progress:
                progress(f"search step {step}/{goal}: checking {len(finalists)} sets on held-out text")
            by_base: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
            for m in finalists:
                parent = next((b for b in beam_sets if set(b) <= set(m.pairs)), ())
                by_base.setdefault(parent, []).append(m.pairs)
            for parent, sets in by_base.items():
                for h in calibrator.measure(sets, base=parent, split="heldout"):
                    held[h.pairs] = h
            ranked = sorted(ranked, key=lambda m: (combined(m, held.get(m.pairs)) if m.pairs in held
                                                   else math.inf, m.value(objective), m.pairs))
        beam_sets = [m.pairs for m in ranked[:beam]]
        chosen_m, chosen_h = ranked[0], held.get(ranked[0].pairs)
        trace.append({
            "step": step,
            "evaluated": [dict(m.to_json(), **({"heldout": held[m.pairs].to_json(),
                                                 "combined": round(combined(m, held[m.pairs]), 6)}
                                                if m.pairs in held else {}))
                          for m in sorted(expansions.values(), key=lambda m: (m.value(objective), m.pairs))],
            "kept": [list(s) for s in beam_sets],
            "forward_passes": round(calibrator.forward_passes, 2),
        })
        front.append({"depth": num_layers - step, "perplexity": chosen_m.perplexity, "measured": True})
    pairs = list(chosen_m.pairs) if chosen_m is not None else []
    return Choice(pairs, measured=chosen_m, heldout=chosen_h, trace=trace, front=front)


# ----------------------------------------------------------------------------------------------
# The stage


def make_plan(scores: dict, *, target: Target, strategy: str | None = None, metric: str | None = None,
              calibrator: Calibrator | None = None, allow_edge_layers: bool = False,
              candidates: int = DEFAULT_CANDIDATES, beam: int = DEFAULT_BEAM, verify: int = DEFAULT_VERIFY,
              source: dict | None = None, scores_path: str = "the scores", progress: Progress = None,
              started: float | None = None) -> Plan:
    """Choose pairs for `target` and return the plan (with what was measured, estimated and spent).

    `started` (a time.perf_counter() value) is when the stage began, so the planning time reported
    includes loading the model and measuring the source; default: now.
    """
    started = time.perf_counter() if started is None else started
    source = source or scores["source"]
    num_layers = int(source["num_layers"])
    strategy = strategy or ("search" if calibrator is not None else "greedy")
    if strategy not in STRATEGIES:
        raise LPError(f"--strategy {strategy} does not exist", f"use one of {', '.join(STRATEGIES)}")
    if strategy == "search" and calibrator is None:
        raise LPError("--strategy search measures the model at every step and needs --model",
                      "pass --model MODEL, or use --strategy greedy")
    metric = metric or default_metric(scores)
    values = pair_values(scores, metric, scores_path)
    increases = _loss_increase_values(scores)
    k = pairs_for_target(target, num_layers, allow_edge_layers)
    budget = target.value if target.kind == "max_loss_increase" else None
    allowed = candidate_starts(num_layers, allow_edge_layers)
    objective = calibrator.objective if calibrator is not None else None

    if strategy == "greedy":
        if budget is not None:
            _need_loss_increase(increases, strategy)
        choice = plan_greedy(values, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                             increases=increases, loss_budget=budget)
    elif strategy == "contiguous":
        if budget is not None and calibrator is None:
            _need_loss_increase(increases, strategy)
        choice = plan_contiguous(values, k, num_layers=num_layers, allow_edge_layers=allow_edge_layers,
                                 increases=increases, loss_budget=budget, calibrator=calibrator,
                                 objective=objective or "loss", progress=progress)
    else:
        choice = plan_search(calibrator, rank_pairs(values, allowed), k, num_layers=num_layers,
                             allow_edge_layers=allow_edge_layers, candidates=candidates, beam=beam, verify=verify,
                             loss_budget=budget, progress=progress)
        choice.predicted_loss_increase = _summed_increase(choice.pairs, increases)

    if calibrator is not None and choice.pairs and choice.measured is None:
        if progress:
            progress("measuring the chosen pairs on the calibration text")
        choice.measured = calibrator.measure([choice.pairs])[0]
    if k is not None and len(choice.pairs) != k:
        raise LPError(f"{strategy} found only {len(choice.pairs)} of the {k} pairs asked for",
                      "use a larger --candidates pool or another strategy")
    pairs = validate_pairs(choice.pairs, num_layers, allow_edge_layers)
    if not pairs:
        raise LPError(f"no set of pairs meets {target.describe()}", "allow a larger loss increase")

    details = _details(choice, strategy, calibrator, num_layers, time.perf_counter() - started, objective,
                       candidates, beam, verify)
    calibration = _calibration(calibrator, scores, strategy)
    return Plan(source=source, pairs=pairs, strategy=strategy, metric=metric, target=target.to_json(),
                calibration=calibration, details=details)


def _calibration(calibrator: Calibrator | None, scores: dict, strategy: str) -> dict | None:
    scored = scores.get("calibration")
    if calibrator is None:
        return {"scores": scored} if scored else None
    info = dict(calibrator.provenance)
    info["objective"] = calibrator.objective
    if calibrator.heldout_provenance is not None:
        info["heldout"] = calibrator.heldout_provenance
    if scored:
        info["scores"] = scored
    return info


def _details(choice: Choice, strategy, calibrator, num_layers, seconds, objective, candidates, beam,
             verify) -> dict:
    k = len(choice.pairs)
    details: dict = {
        "num_layers": num_layers,
        "num_pairs": k,
        "effective_depth": num_layers - k,
        "estimated_speedup": round(estimated_speedup(num_layers, k), 4),
        "speedup_note": SPEEDUP_NOTE,
    }
    if choice.predicted_loss_increase is not None:
        details["summed_single_pair_loss_increase"] = round(choice.predicted_loss_increase, 6)
    if calibrator is not None:
        base = calibrator.base["calib"]
        details["objective"] = objective
        details["source_calibration"] = {"loss": round(base.loss, 6), "perplexity": round(base.perplexity, 4)}
        if choice.measured is not None:
            m = choice.measured
            details["calibration"] = dict(m.to_json(), loss_increase=round(m.loss / base.loss - 1, 6))
        if choice.heldout is not None:
            hb = calibrator.base["heldout"]
            details["heldout"] = dict(choice.heldout.to_json(), loss_increase=round(choice.heldout.loss / hb.loss - 1, 6),
                                      source_perplexity=round(hb.perplexity, 4))
        details["cost"] = calibrator.cost()
    else:
        details["cost"] = {"set_evaluations": 0, "forward_passes": 0, "note": "ranked from the scores file only"}
    if strategy == "search":
        details["search"] = {"candidates": candidates, "beam": beam, "verify": verify}
    details["planning_seconds"] = round(seconds, 1)
    if choice.trace:
        details["trace"] = choice.trace
    if choice.front:
        details["front"] = choice.front
    return details


# ----------------------------------------------------------------------------------------------
# The quality/depth front


def front_series(plan: Plan, scores: dict) -> tuple[dict[str, list[dict]], float | None]:
    """Calibration perplexity against effective depth for each strategy, and the source's perplexity.

    The planned strategy contributes what it measured along the way; the others are estimated from
    the scores' single-pair loss increases (summed: pairs interact, so these are optimistic guesses).
    """
    num_layers = plan.num_layers
    details = plan.details
    base_loss = (details.get("source_calibration") or {}).get("loss") or (scores.get("base") or {}).get("loss")
    series: dict[str, list[dict]] = {}
    if details.get("front"):
        series[plan.strategy] = [dict(p) for p in details["front"]]
    elif "calibration" in details:
        series[plan.strategy] = [{"depth": plan.effective_depth, "perplexity": details["calibration"]["perplexity"],
                                  "measured": True}]
    increases = _loss_increase_values(scores)
    allow_edges = any(p == 0 or p + 2 == num_layers for p in plan.pairs)
    if increases is not None and base_loss is not None:
        most = max_pairs(num_layers, allow_edges)
        for name in ("contiguous", "greedy"):
            if name in series:
                continue
            points = []
            for k in range(1, most + 1):
                if name == "greedy":
                    chosen = plan_greedy(increases, k, num_layers=num_layers, allow_edge_layers=allow_edges).pairs
                else:
                    chosen = plan_contiguous(increases, k, num_layers=num_layers, allow_edge_layers=allow_edges,
                                             increases=increases).pairs
                total = _summed_increase(chosen, increases)
                if len(chosen) == k and total is not None:
                    points.append({"depth": num_layers - k, "perplexity": math.exp(base_loss * (1 + total)),
                                   "measured": False})
            if points:
                series[name] = points
    return series, (None if base_loss is None else math.exp(base_loss))


def plot_front(plan: Plan, scores: dict, path) -> None:
    """Write the quality/depth front as a PNG (matplotlib, Agg backend)."""
    from pathlib import Path

    series, source_ppl = front_series(plan, scores)
    if not series:
        raise LPError("--plot needs measured losses: none are known for this plan",
                      "pass --model, or scores measured with --measure-loss")
    try:
        import matplotlib
    except ImportError:
        raise LPError("--plot needs matplotlib, which is not installed", "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = plan.num_layers
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, points in series.items():
        points = sorted(points, key=lambda p: -p["depth"])
        measured = all(p["measured"] for p in points)
        depths = [num_layers] + [p["depth"] for p in points] if source_ppl else [p["depth"] for p in points]
        ppls = [source_ppl] + [p["perplexity"] for p in points] if source_ppl else [p["perplexity"] for p in points]
        label = name + (" (measured)" if measured else " (estimated from single pairs)")
        ax.plot(depths, ppls, marker="o" if measured else ".", linestyle="-" if measured else "--",
                color=STRATEGY_COLORS.get(name), label=label)
    ax.scatter([plan.effective_depth], [_chosen_ppl(plan, series)], s=160, facecolors="none",
               edgecolors="black", zorder=5, label=f"plan: {plan.strategy}, depth {plan.effective_depth}")
    if source_ppl:
        ax.axhline(source_ppl, color="gray", linewidth=0.8, linestyle=":", label=f"source ({source_ppl:.2f})")
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("effective depth (blocks)")
    ax.set_ylabel("calibration perplexity")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 22, not 2.2 x 10^1, on a narrow log range
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Quality/depth front ({num_layers} layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(Path(path), format="png")
    except OSError as exc:
        raise LPError(f"cannot write the plot {path}: {exc.strerror or exc}", "check the path") from None
    finally:
        plt.close(fig)


def _chosen_ppl(plan: Plan, series: dict) -> float:
    if "calibration" in plan.details:
        return plan.details["calibration"]["perplexity"]
    for p in series.get(plan.strategy, []):
        if p["depth"] == plan.effective_depth:
            return p["perplexity"]
    return math.nan
