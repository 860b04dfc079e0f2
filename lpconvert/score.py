"""Score: how much each layer and each candidate pair matters, measured on calibration text.

One pass over the calibration windows runs the model layer by layer (runner.LayerRunner) and
accumulates, per window, statistics of the residual stream (nothing is kept across windows):

- per layer i: angular distance arccos(cos(x_i, x_{i+1})) / pi over all tokens and over the last
  token (Gromov et al.), and block influence 1 - cos(x_i, x_{i+1}) (ShortGPT);
- per candidate pair (i, i+1): the angular distance across both layers, and the LP pair error:
  the captured input of layer i goes through the two layers sequentially and in parallel, and we
  compare the two updates: relative L2 ||par - seq|| / ||seq - x_i|| and the cosine between them.

`measure_loss` adds the ground truth: the calibration loss of the whole model with only that pair
run in parallel, for every pair, on its own token budget. The stream before each layer is captured
once, so a candidate pair at layer i only runs layers i..L.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

from . import __version__
from .archs import architecture_for, unpairable_starts
from .errors import LPError
from .formats import PAIR_METRICS, SCORES_KIND, SCORES_SCHEMA_VERSION, source_fingerprint
from .memory import Setter, check_fits, logits_bytes, memory_fixes, memory_plan, option_setter, stream_bytes
from .runner import LayerRunner, batches, locate_nonfinite, not_finite_fix
from .runtime import check_positions, dtype_from_name, resolve_device, text_windows
from .settings import CHEAP_METRICS, SCORE_METRICS, ScoreSettings  # noqa: F401  (ScoreSettings: the stage's API)
from .streaming import load_model

ALL_METRICS = SCORE_METRICS


# ----------------------------------------------------------------------------------------------
# Accumulators: sums over windows, so memory does not grow with the calibration set


class Sums:
    def __init__(self, size: int):
        self.values: dict[str, torch.Tensor] = {}
        self.size = size

    def add(self, name: str, index: int, value: torch.Tensor | float) -> None:
        if name not in self.values:
            self.values[name] = torch.zeros(self.size, dtype=torch.float64)
        self.values[name][index] += float(value)

    def get(self, name: str, index: int) -> float:
        return float(self.values[name][index])


def _angular(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _capture_cheap_metrics(runner: LayerRunner, input_ids: torch.Tensor, settings: ScoreSettings,
                           tick: Callable[[], None]) -> tuple[Sums, Sums, float, int]:
    """One pass, layer-major: every batch goes through layer i before layer i+1 is read (a streamed model reads
    each layer once). Kept between layers: the stream before layer i and before layer i-1, for every window.
    Layer and pair statistics are summed over windows, and the base calibration NLL taken at the end."""
    num_layers = runner.num_layers
    layers, pairs = Sums(num_layers), Sums(num_layers - 1)
    want_pairs = "pair_error" in settings.metrics
    windows = list(batches(input_ids, settings.batch_size))
    xs = [runner.embed(ids) for ids in windows]
    before_prev: list[torch.Tensor | None] = [None] * len(xs)
    for i in range(num_layers):
        ys = []
        for b, x in enumerate(xs):
            y = runner.layer(i, x)
            cos = _token_cos(x, y)
            layers.add("angular_distance", i, _angular(cos).sum())
            layers.add("angular_distance_last", i, _angular(cos[:, -1]).sum())
            layers.add("block_influence", i, (1 - cos).sum())
            layers.add("tokens", i, cos.numel())
            layers.add("windows", i, cos.shape[0])
            if before_prev[b] is not None:
                _add_pair(runner, pairs, i - 1, before_prev[b], y, want_pairs)
            ys.append(y)
            tick()  # per layer and batch, so a bar moves even when the whole budget is one batch
        before_prev, xs = xs, ys
    del before_prev
    nll_total, nll_count = 0.0, 0
    for ids, x in zip(windows, xs, strict=True):
        total, count = runner.nll(x, ids)
        nll_total, nll_count = nll_total + total, nll_count + count
    return layers, pairs, nll_total, nll_count


def _add_pair(runner: LayerRunner, pairs: Sums, p: int, before: torch.Tensor, after: torch.Tensor,
              want_pairs: bool) -> None:
    """Pair (p, p+1)'s statistics for one batch: its input `before` and sequential output `after`."""
    cos2 = _token_cos(before, after)
    pairs.add("angular_distance", p, _angular(cos2).sum())
    pairs.add("tokens", p, cos2.numel())
    if want_pairs:
        sequential = (after - before).float()
        parallel = (runner.pair(p, before) - before).float()
        pairs.add("diff_sq", p, (parallel - sequential).pow(2).sum())
        pairs.add("update_sq", p, sequential.pow(2).sum())
        pairs.add("cosine", p, F.cosine_similarity(parallel, sequential, dim=-1).sum())


def _measure_pair_losses(runner: LayerRunner, input_ids: torch.Tensor, settings: ScoreSettings,
                         tick: Callable[[], None]) -> tuple[float, list[float]]:
    """Base loss and the loss with each single pair in parallel, on `input_ids` (the loss budget).

    One layer-major pass reads each layer once: at layer i the base stream goes on through layer i, pair
    (i, i+1) branches off it (run in parallel on the base stream at i), and every pair that branched below
    goes on through layer i. Kept: one stream per pair branched so far, at most num_layers - 1 streams of
    the loss budget (what check_score_memory counts), the price of reading the model once rather than once
    per pair."""
    num_layers = runner.num_layers
    windows = list(batches(input_ids, settings.batch_size))
    base = [runner.embed(ids) for ids in windows]
    branches: dict[int, list[torch.Tensor]] = {}  # pair start -> its stream, per batch, at the current layer
    for i in range(num_layers):
        for p, xs in branches.items():
            if i >= p + 2:  # a pair's own two layers ran in parallel when it branched
                branches[p] = [runner.layer(i, x) for x in xs]
        if i < num_layers - 1:
            branches[i] = [runner.pair(i, x) for x in base]
        base = [runner.layer(i, x) for x in base]
        tick()
    base_total, base_count = _nll(runner, base, windows)
    losses = []
    for p in range(num_layers - 1):
        total, count = _nll(runner, branches.pop(p), windows)
        losses.append(total / count)
    tick()
    return base_total / base_count, losses


def _nll(runner: LayerRunner, streams: list[torch.Tensor], windows: list[torch.Tensor]) -> tuple[float, int]:
    total = count = 0
    for x, ids in zip(streams, windows, strict=True):
        t, c = runner.nll(x, ids)
        total, count = total + t, count + c
    return total, count


# ----------------------------------------------------------------------------------------------
# Rankings and agreement


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in ra)
    var_b = sum((y - mean_b) ** 2 for y in rb)
    return cov / math.sqrt(var_a * var_b) if var_a and var_b else float("nan")


def safest_pairs(pairs: list[dict], metric: str, count: int = 5) -> list[int]:
    """Pair starts ordered from safest, by one metric (PAIR_METRICS says which direction is safe)."""
    rows = [p for p in pairs if p.get(metric) is not None]
    sign = 1 if PAIR_METRICS[metric] == "low" else -1
    return [p["first"] for p in sorted(rows, key=lambda p: sign * p[metric])][:count]


def metric_agreement(pairs: list[dict], edges: bool = False) -> dict[str, float]:
    """Spearman correlation of each cheap pair metric (oriented so higher = riskier) with the measured
    loss increase; the first and last pairs are left out unless `edges` (they dominate any ranking)."""
    rows = [p for p in pairs if p.get("loss_increase") is not None
            and (edges or 0 < p["first"] < len(pairs) - 1)]
    out = {}
    for metric, direction in PAIR_METRICS.items():
        if metric == "loss_increase" or any(p.get(metric) is None for p in rows) or len(rows) < 3:
            continue
        sign = 1 if direction == "low" else -1
        out[metric] = spearman([sign * p[metric] for p in rows], [p["loss_increase"] for p in rows])
    return out


# ----------------------------------------------------------------------------------------------
# The stage


def _check_finite(runner: LayerRunner, ids: torch.Tensor, name: str, dtype: str, setter: Setter,
                  losses: list[float], layers: list[dict], pairs: list[dict]) -> None:
    """Refuse measurements that are not numbers (NaN weights, an overflow), naming where the stream breaks:
    a plan chosen from NaN ranks nothing."""
    def finite(row: dict) -> bool:
        return all(math.isfinite(v) for v in row.values() if isinstance(v, float))

    bad_layer = next((row["layer"] for row in layers if not finite(row)), None)
    bad_pair = next((row["first"] for row in pairs if not finite(row)), None)
    if bad_layer is None and bad_pair is None and all(math.isfinite(v) for v in losses):
        return
    where = locate_nonfinite(runner, ids)
    if where == "the measurements":  # the stream stays finite: a measurement of one layer or pair broke
        where = (f"layer {bad_layer}'s measurements" if bad_layer is not None else
                 f"pair ({bad_pair}, {bad_pair + 1}) run in parallel" if bad_pair is not None else "the loss")
    raise LPError(f"score measured NaN or Inf on {name}, starting at {where}: no pair can be ranked from it",
                  not_finite_fix(dtype, setter))


def score_working_bytes(config, settings: ScoreSettings) -> int:
    """What score keeps besides weights: a batch's logits, the streams of every calibration window (three, layer-major:
    before layer i-1, before i, after i; one whole-model: the batch in flight) and, measuring losses, one stream
    of the loss windows per pair."""
    streaming = settings.load == "stream" and settings.device_map is None
    tokens = settings.tokens if streaming else settings.batch_size * settings.seq_len
    working = logits_bytes(config, settings.batch_size, settings.seq_len)
    working += stream_bytes(config, tokens, settings.dtype, streams=3)
    if settings.measure_loss or "loss" in settings.metrics:
        windows = math.ceil(settings.loss_tokens / settings.seq_len)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        working += stream_bytes(config, windows * settings.seq_len, settings.dtype, streams=layers)
    return working


def check_score_memory(source, settings: ScoreSettings, device: str, setter: Setter = option_setter) -> str:
    """The weights score holds (a layer at a time, or the whole model), a batch's logits and the kept streams must fit:
    refused in one line before anything loads (memory.py). Returns the memory plan, one line to print."""
    measuring = settings.measure_loss or "loss" in settings.metrics
    working = score_working_bytes(source.config, settings)
    load = "whole" if settings.device_map is not None else settings.load
    check_fits(source, stage="score", dtype=settings.dtype, device=device, working=working,
               spread=settings.device_map is not None, load=load,
               fixes=memory_fixes(setter, dtype=settings.dtype,
                                  tokens=(*(("tokens",) if load == "stream" else ()),
                                          *(("loss_tokens",) if measuring else ())),
                                  device_map=settings.device_map))
    return memory_plan(source, dtype=settings.dtype, load=load, working=working)


def compute_scores(source, settings: ScoreSettings, progress: Callable[[str, int, int], None] | None = None,
                   setter: Setter = option_setter) -> dict:
    """Score every layer and candidate pair of `source` on calibration text; returns the scores JSON.
    `setter` names a setting in messages as the user wrote it (--dtype, or score.dtype in a recipe)."""
    started = time.perf_counter()
    architecture_for(source.config)
    if settings.tokens <= 0 or settings.loss_tokens <= 0:
        raise LPError("--tokens and --loss-tokens must be positive", "e.g. --tokens 16384")
    check_positions(source.name, source.config, settings.seq_len, "--seq-len")
    if (settings.measure_loss or "loss" in settings.metrics) and settings.loss_tokens < settings.seq_len:
        raise LPError(f"--loss-tokens {settings.loss_tokens} is less than one window of --seq-len {settings.seq_len}",
                      f"use --loss-tokens {settings.seq_len} or more, or a smaller --seq-len")
    device = resolve_device(settings.device)
    dtype = dtype_from_name(settings.dtype)
    plan = check_score_memory(source, settings, device, setter)
    if progress:
        progress("reading the calibration text and loading the model", None, None)
    _, windows = text_windows(source.load_tokenizer(), settings.calib, text_field=settings.text_field,
                              tokens=settings.tokens, seq_len=settings.seq_len, seed=settings.seed, split="calib")
    model = load_model(source, dtype=dtype, device=device, load=settings.load, device_map=settings.device_map)
    runner = LayerRunner(model, settings.seq_len)
    num_layers = runner.num_layers
    n_batches = math.ceil(windows.input_ids.shape[0] / settings.batch_size)
    done = {"n": 0}

    def tick_for(label: str, total: int):
        done["n"] = 0

        def tick():
            done["n"] += 1
            if progress:
                progress(label, done["n"], total)

        return tick

    timings = {"load_seconds": time.perf_counter() - started}
    with torch.inference_mode():
        t0 = time.perf_counter()
        layer_sums, pair_sums, nll_total, nll_count = _capture_cheap_metrics(
            runner, windows.input_ids, settings, tick_for("scoring layers and pairs", n_batches * num_layers))
        timings["metrics_seconds"] = time.perf_counter() - t0
        loss_result = None
        if settings.measure_loss or "loss" in settings.metrics:
            t0 = time.perf_counter()
            n_loss = math.ceil(settings.loss_tokens / settings.seq_len)
            loss_ids = windows.input_ids[:n_loss]
            loss_result = _measure_pair_losses(runner, loss_ids, settings,
                                               tick_for("measuring the loss of each pair", num_layers + 1))
            timings["loss_seconds"] = time.perf_counter() - t0

    base_loss = nll_total / nll_count
    layers = []
    for i in range(num_layers):
        tokens, windows_seen = layer_sums.get("tokens", i), layer_sums.get("windows", i)
        layers.append({
            "layer": i,
            "angular_distance": layer_sums.get("angular_distance", i) / tokens,
            "angular_distance_last": layer_sums.get("angular_distance_last", i) / windows_seen,
            "block_influence": layer_sums.get("block_influence", i) / tokens,
        })
    pairs = []
    for p in range(num_layers - 1):
        row = {"first": p, "angular_distance": pair_sums.get("angular_distance", p) / pair_sums.get("tokens", p)}
        if "pair_error" in settings.metrics:
            row["pair_rel_l2"] = math.sqrt(pair_sums.get("diff_sq", p) / pair_sums.get("update_sq", p))
            row["pair_cosine"] = pair_sums.get("cosine", p) / pair_sums.get("tokens", p)
        pairs.append(row)

    _check_finite(runner, windows.input_ids[:settings.batch_size], source.name, settings.dtype, setter,
                  [base_loss, *(loss_result[1] if loss_result else [])], layers, pairs)
    base = {"loss": base_loss, "perplexity": math.exp(base_loss), "tokens": nll_count}
    loss_provenance = None
    if loss_result is not None:
        subset_loss, losses = loss_result
        base["loss_subset"] = subset_loss
        for row, loss in zip(pairs, losses, strict=True):
            row.update(loss=loss, perplexity=math.exp(loss), loss_increase=loss / subset_loss - 1)
        loss_provenance = {"windows": int(loss_ids.shape[0]), "tokens": int(loss_ids.numel()),
                           "note": "the first windows of the calibration set"}
    metrics_used = list(dict.fromkeys([*settings.metrics, *(["loss"] if loss_result else [])]))
    buildable = [r for r in pairs if r["first"] not in unpairable_starts(source.config)]
    result = {
        "schema_version": SCORES_SCHEMA_VERSION,
        "kind": SCORES_KIND,
        "source": source_fingerprint(source.config, source.store),
        "model": {"name": source.name, "num_layers": num_layers, "architecture": source.config.model_type},
        "calibration": windows.provenance,
        "loss_calibration": loss_provenance,
        "base": base,
        "layers": layers,
        "pairs": pairs,
        "metrics": metrics_used,
        # the safest that can be built: not a local layer with a global one (source fingerprint's "unpairable")
        "safest_pairs": {m: safest_pairs(buildable, m) for m in PAIR_METRICS if m in pairs[0]},
        "agreement_with_loss": metric_agreement(pairs) if loss_result else None,
        "settings": {**asdict(settings), "metrics": list(settings.metrics), "device": device},
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
        "memory_plan": plan,
        "created_by": f"lpconvert {__version__}",
    }
    return result
