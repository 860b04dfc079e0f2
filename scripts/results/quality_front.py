"""Quality/depth front: held-out perplexity of each planning strategy on SmolLM2-135M.

Plans pairs for SmolLM2 (30 layers) with each strategy at each effective depth, choosing only on
Wikipedia text (`wiki` calibration windows and their held-out split), and reports the perplexity
of the paired model on the `news` text, which no strategy sees:

    .venv/bin/python scripts/results/quality_front.py                      # all 147 news windows (75k tokens)
    .venv/bin/python scripts/results/quality_front.py --news-every 3       # every third window (faster)
    .venv/bin/python scripts/results/quality_front.py --depths 25 --strategies search --tokens 16384

Strategies run as `lpconvert plan` runs them (lpconvert.plan.make_plan), with the CLI's defaults
unless options here say otherwise; the contiguous rule is the paper's: a perplexity (loss) sweep
over every contiguous run, on the scores' calibration tokens. The scores (single-pair calibration
loss on --score-tokens tokens of --calib) come from lpconvert.score.compute_scores, cached in --scores
(reused only for the same model, settings and text).
Planning time counts what `lpconvert plan` would do after scoring: loading the model, tokenising,
measuring. Target (issue 5): at 25 layers the default strategy's increase over the source is at most
75% of the contiguous rule's, in at most 10 minutes of planning on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lpconvert.errors import run_script  # noqa: E402
from lpconvert.formats import source_fingerprint  # noqa: E402
from lpconvert.plan import (  # noqa: E402
    DEFAULT_BEAM,
    DEFAULT_CANDIDATES,
    DEFAULT_HELDOUT_TOKENS,
    DEFAULT_TOKENS,
    DEFAULT_VERIFY,
    Calibrator,
    Target,
    build_calibrator,
    make_plan,
)
from lpconvert.plots import STRATEGY_COLORS, check_plot_path, pyplot, save_figure  # noqa: E402
from lpconvert.settings import STRATEGIES, PlanSettings  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402
from lpconvert.texts import resolve_text, tokenize_windows  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def score_settings(tokens: int, calib: str):
    """The scores this script plans from: single-pair calibration loss measured on TOKENS tokens of CALIB."""
    from lpconvert.score import ScoreSettings

    return ScoreSettings(calib=calib, tokens=tokens, measure_loss=True, loss_tokens=tokens, device="cpu")


def cache_key(source, settings) -> dict:
    """Everything the scores depend on: the model (its fingerprint), every score setting (--score-tokens and --calib
    among them) and the calibration text itself (its digest, read as compute_scores reads it)."""
    from dataclasses import asdict

    from lpconvert.texts import bytes_for_tokens

    text = resolve_text(settings.calib, text_field=settings.text_field,
                        max_bytes=bytes_for_tokens(settings.tokens, settings.seq_len))
    return {"source": source_fingerprint(source.config, source.store),
            "settings": json.loads(json.dumps({**asdict(settings), "metrics": list(settings.metrics)})),
            "calibration_sha256": text.sha256}


def key_of(scores: dict) -> dict:
    """A scores file's cache key, as written by compute_scores (cache_key's fields)."""
    return {"source": scores.get("source"), "settings": scores.get("settings"),
            "calibration_sha256": (scores.get("calibration") or {}).get("sha256")}


def get_scores(source, path: Path | None, tokens: int, calib: str) -> tuple[dict, float]:
    """The scores file (with measured single-pair loss), computed once and cached in `path`: reused only when it
    was made from the same model, settings and text (cache_key), else computed again and the cache replaced."""
    settings = score_settings(tokens, calib)
    if path is not None and path.exists():
        scores = json.loads(path.read_text())
        if key_of(scores) == cache_key(source, settings):
            log(f"scores from {path}")
            return scores, float(scores.get("timings", {}).get("total_seconds", math.nan))
        log(f"{path} holds scores of another model, text or settings: scoring again")
    from lpconvert.score import compute_scores

    log(f"scoring: single-pair calibration loss on {tokens} {calib} tokens")
    started = time.perf_counter()
    scores = compute_scores(source, settings)
    seconds = time.perf_counter() - started
    if path is not None:
        path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores, seconds


def plan_one(source, scores: dict, strategy: str, depth: int, args) -> dict:
    """Plan as `lpconvert plan` does, timing everything after the scores."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    contiguous = strategy == "contiguous"
    settings = PlanSettings(strategy=strategy, calib=args.calib, tokens=args.score_tokens if contiguous else args.tokens,
                            seq_len=args.seq_len, seed=args.seed, candidates=args.candidates, beam=args.beam,
                            verify=0 if contiguous else args.verify, heldout_tokens=args.heldout_tokens,
                            objective="loss" if contiguous else args.objective, batch_size=args.batch_size,
                            device="cpu", dtype="float32")
    calibrator = build_calibrator(source, settings) if strategy in ("contiguous", "search") else None
    plan = make_plan(scores, Target("depth", depth), settings, calibrator, source=scores["source"], started=started,
                     progress=lambda m: log(f"  {m}"))
    seconds = time.perf_counter() - started
    details = plan.details
    cost = details.get("cost", {})
    row = {
        "strategy": strategy, "depth": depth, "pairs": plan.pairs,
        "planning_seconds": round(seconds, 1), "planning_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "set_evaluations": cost.get("set_evaluations", 0), "forward_passes": cost.get("forward_passes", 0),
        "calibration_tokens": cost.get("calibration_tokens", 0), "heldout_tokens": cost.get("heldout_tokens", 0),
        "tokens_processed": cost.get("tokens_processed", 0),
        "calibration_perplexity": details.get("calibration", {}).get("perplexity"),
        "settings": ({"objective": details.get("objective"), **details.get("search", {})}
                     if calibrator is not None else {"metric": plan.metric}),
    }
    if strategy == "search":
        row["trace"] = [{"step": s["step"], "kept": s["kept"], "forward_passes": s["forward_passes"]}
                        for s in details.get("trace", [])]
    del calibrator
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--depths", default="27,25,23")
    parser.add_argument("--strategies", default="contiguous,greedy,search")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--eval-text", default="news")
    parser.add_argument("--news-every", type=int, default=1, help="Evaluate every n-th window of the news text.")
    parser.add_argument("--score-tokens", type=int, default=4096)
    parser.add_argument("--scores", type=Path, default=Path("/tmp/lpconvert-quality-scores.json"))
    # Search settings (default: the CLI's).
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--heldout-tokens", type=int, default=DEFAULT_HELDOUT_TOKENS)
    parser.add_argument("--objective", default=PlanSettings.objective)
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM)
    parser.add_argument("--verify", type=int, default=DEFAULT_VERIFY)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--extra-sets", default="", help="More pair sets to evaluate, e.g. '7,13,17,20,25;9,11'.")
    parser.add_argument("--out", type=Path, default=None, help="Write the JSON here too.")
    parser.add_argument("--plot", type=Path, default=None, help="Draw held-out perplexity against depth (.png, .svg or .pdf).")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="Print the table (and --plot) of an earlier run's JSON instead of running.")
    parser.add_argument("--merge", nargs=2, type=Path, metavar=("INTO", "OTHER"),
                        help="put OTHER's rows (another --out) into INTO in place of the same depth/strategy, then "
                             "print (and --plot) INTO")
    args = parser.parse_args()
    if args.plot:
        check_plot_path(args.plot)  # before minutes of work
    if args.merge:
        merge(*args.merge)
        args.from_json = args.merge[0]
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        print(markdown(result))
        if args.plot:
            plot(result, args.plot)
        return
    torch.set_grad_enabled(False)
    started = time.perf_counter()

    source = resolve_model(args.model)
    strategies = [s for s in args.strategies.split(",") if s]  # none: only --extra-sets are measured (no scores)
    scores, score_seconds = get_scores(source, args.scores, args.score_tokens, args.calib) if strategies else ({}, 0.0)
    num_layers = source.config.num_hidden_layers

    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for strategy in strategies:
            log(f"planning: {strategy} at depth {depth}")
            row = plan_one(source, scores, strategy, depth, args)
            log(f"  -> {row['pairs']} in {row['planning_seconds']} s, {row['forward_passes']} forward passes")
            rows.append(row)

    log(f"evaluating on {args.eval_text}")
    model = source.load_model(dtype=torch.float32, device="cpu")
    tokenizer = source.load_tokenizer()
    windows = tokenize_windows(tokenizer, resolve_text(args.eval_text), seq_len=args.seq_len, num_tokens=None,
                               seed=0, split="all")
    ids = windows.input_ids[::args.news_every]
    evaluator = Calibrator(model, ids, objective="loss", batch_size=args.batch_size)
    extra = [tuple(int(p) for p in s.split(",")) for s in args.extra_sets.split(";") if s.strip()]
    sets = list(dict.fromkeys([tuple(r["pairs"]) for r in rows] + extra))
    measured = {m.pairs: m for m in evaluator.measure(sets)}
    source_ppl = evaluator.base["calib"].perplexity
    for row in rows:
        m = measured[tuple(row["pairs"])]
        row["heldout_perplexity"] = round(m.perplexity, 3)
        row["heldout_kl"] = round(m.kl, 5)
        row["increase"] = round(m.perplexity - source_ppl, 3)
    add_ratios_to_contiguous(rows)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "model": args.model, "num_layers": num_layers,
        "calibration": args.calib, "score_tokens": args.score_tokens, "scoring_seconds": round(score_seconds, 1),
        "evaluation": {"text": args.eval_text, "windows": int(ids.shape[0]), "tokens": int(ids.numel()),
                       "every": args.news_every, "source_perplexity": round(source_ppl, 3)},
        "search_settings": {"tokens": args.tokens, "heldout_tokens": args.heldout_tokens, "objective": args.objective,
                            "candidates": args.candidates, "beam": args.beam, "verify": args.verify},
        "rows": rows,
        "extra_sets": [{"pairs": list(s), "heldout_perplexity": round(measured[s].perplexity, 3)} for s in extra],
        "torch_threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(markdown(result))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)


def add_ratios_to_contiguous(rows: list[dict]) -> None:
    """Each row's perplexity increase as a share of the contiguous rule's at the same depth."""
    contiguous = {r["depth"]: r["increase"] for r in rows if r["strategy"] == "contiguous"}
    for row in rows:
        if contiguous.get(row["depth"], 0) > 0:
            row["increase_vs_contiguous"] = round(row["increase"] / contiguous[row["depth"]], 3)


def merge(into: Path, other: Path) -> None:
    """Rows planned by separate runs (e.g. search at other depths) in one front: the source, the scores and
    the held-out text must be the same; the ratios to the contiguous rule are recomputed."""
    result, added = json.loads(into.read_text()), json.loads(other.read_text())
    same = ("model", "calibration", "score_tokens", "evaluation")
    if any(result[k] != added[k] for k in same):
        raise SystemExit(f"{other} differs from {into} in one of {', '.join(same)}")
    key = lambda row: (row["depth"], row["strategy"])  # noqa: E731
    replaced = {key(row) for row in added["rows"]}
    rows = [row for row in result["rows"] if key(row) not in replaced] + added["rows"]
    add_ratios_to_contiguous(rows)
    result["rows"] = sorted(rows, key=lambda r: (-r["depth"], STRATEGIES.index(r["strategy"])))
    result["command"] = [*([result["command"]] if isinstance(result["command"], str) else result["command"]),
                         added["command"]]
    result["total_seconds"] = round(result["total_seconds"] + added["total_seconds"], 1)
    into.write_text(json.dumps(result, indent=1) + "\n")


def plot(result: dict, path: Path) -> None:
    """Held-out perplexity against effective depth, one line per strategy, the source as depth L."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    ev = result["evaluation"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for strategy in dict.fromkeys(r["strategy"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["strategy"] == strategy), key=lambda r: -r["depth"])
        depths = [result["num_layers"]] + [r["depth"] for r in rows]
        ppls = [ev["source_perplexity"]] + [r["heldout_perplexity"] for r in rows]
        label = {"contiguous": "contiguous (the paper's rule)", "search": "search (lpconvert's default)"}
        ax.plot(depths, ppls, marker="o", color=STRATEGY_COLORS.get(strategy), label=label.get(strategy, strategy))
    ax.axhline(ev["source_perplexity"], color="gray", linewidth=0.8, linestyle=":",
               label=f"source ({ev['source_perplexity']:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_xaxis()
    ax.set_xlabel("effective depth (blocks)")
    ax.set_ylabel(f"held-out perplexity ({ev['text']}, {ev['tokens']} tokens)")
    ax.set_title(f"{result['model']}: quality against depth (planned on {result['calibration']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def markdown(result: dict) -> str:
    ev = result["evaluation"]
    lines = [f"Held-out perplexity on `{ev['text']}` ({ev['windows']} windows, {ev['tokens']} tokens); source "
             f"{ev['source_perplexity']:.2f}. Scores: single-pair loss on {result['score_tokens']} "
             f"`{result['calibration']}` tokens ({result['scoring_seconds']:.0f} s, not in planning time).", "",
             "| depth | strategy | pairs | held-out ppl | increase | vs contiguous | calib. ppl | sets measured | "
             "forward passes | calib. + held-out tokens | planning time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = r.get("increase_vs_contiguous")
        calib_ppl = r.get("calibration_perplexity")
        tokens = f"{r['calibration_tokens']} + {r['heldout_tokens']}" if r["calibration_tokens"] else "scores only"
        lines.append(f"| {r['depth']} | {r['strategy']} | {','.join(map(str, r['pairs']))} | "
                     f"{r['heldout_perplexity']:.2f} | +{r['increase']:.2f} | "
                     f"{'' if ratio is None else f'{100 * ratio:.0f}%'} | "
                     f"{'' if calib_ppl is None else f'{calib_ppl:.2f}'} | {r['set_evaluations']} | "
                     f"{r['forward_passes']} | {tokens} | {r['planning_seconds']:.0f} s |")
    for extra in result.get("extra_sets", []):
        lines.append(f"| | (extra) | {','.join(map(str, extra['pairs']))} | {extra['heldout_perplexity']:.2f} | "
                     "| | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)  # a bad --plot path: one line and exit 2, as the CLI says it
