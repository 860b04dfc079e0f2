"""Benchmark the score stage on SmolLM2-135M: cost of the cheap metrics and of --measure-loss, and
how well each cheap metric's pair ranking agrees with the measured loss (Spearman).

    python scripts/results/bench_score.py            # 16k wiki tokens for the metrics, 4k for the loss
Writes docs/scores_smollm2.json and docs/scores_smollm2.png and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from lpconvert.plots import plot_scores  # noqa: E402
from lpconvert.score import ScoreSettings, compute_scores, safest_pairs  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--loss-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scores_smollm2.json")
    args = parser.parse_args()
    source = resolve_model("smollm2-135m")

    started = time.perf_counter()
    cheap = compute_scores(source, ScoreSettings(tokens=args.tokens, device="cpu"))
    cheap_seconds = time.perf_counter() - started
    started = time.perf_counter()
    full = compute_scores(source, ScoreSettings(tokens=args.loss_tokens, loss_tokens=args.loss_tokens,
                                                measure_loss=True, device="cpu"))
    loss_seconds = time.perf_counter() - started
    # The cheap metrics from the 16k run, the measured loss from the loss run.
    for row, measured in zip(cheap["pairs"], full["pairs"], strict=True):
        row.update({k: measured[k] for k in ("loss", "perplexity", "loss_increase")})
    from lpconvert.score import metric_agreement

    cheap["agreement_with_loss"] = metric_agreement(cheap["pairs"])
    cheap["agreement_with_loss_all_pairs"] = metric_agreement(cheap["pairs"], edges=True)
    cheap["safest_pairs"]["loss_increase"] = safest_pairs(cheap["pairs"], "loss_increase")
    cheap["base"]["loss_subset"] = full["base"]["loss_subset"]
    cheap["loss_calibration"] = full["loss_calibration"]
    cheap["benchmark"] = {"cheap_metrics_seconds": cheap_seconds, "measure_loss_seconds": loss_seconds,
                          "date": time.strftime("%Y-%m-%d"), "machine": "2 CPU cores, float32"}
    args.out.write_text(json.dumps(cheap, indent=2) + "\n")
    plot_scores(cheap, args.out.with_suffix(".png"))

    print(f"cheap metrics, {args.tokens} wiki tokens: {cheap_seconds:.0f} s (whole command: load, tokenise, score)")
    print(f"--measure-loss, {args.loss_tokens} tokens: {loss_seconds:.0f} s")
    print(f"base calibration perplexity {cheap['base']['perplexity']:.2f}\n")
    print("| metric | safest pair starts (best first) | Spearman vs measured loss, middle pairs | all pairs |")
    print("|---|---|---|---|")
    for metric, firsts in cheap["safest_pairs"].items():
        rho = cheap["agreement_with_loss"].get(metric)
        rho_all = cheap["agreement_with_loss_all_pairs"].get(metric)
        print(f"| {metric} | {', '.join(map(str, firsts))} | {'' if rho is None else f'{rho:+.2f}'} | "
              f"{'' if rho_all is None else f'{rho_all:+.2f}'} |")


if __name__ == "__main__":
    main()
