"""Every plan at one depth, measured: what any objective could reach, and which plans meet a damage bound.

A search sees a few dozen of the pair sets that fit; on a shallow model the census measures all of them
(Gemma-3-270M at 15 of 18 blocks: 98 sets of 3 pairs). For each set that fits (no overlap, no edge layer,
no local/global pair: lpconvert/plan/layers.py) it measures every objective of lpconvert/plan/objectives.py
on

* news, every --news-every-th window (the held-out text of quality_front.py, which no strategy reads):
  the perplexity damage a plan does, as a share of the --versus plan's (the contiguous rule's);
* optionally wiki's calibration windows (--wiki-tokens, what `plan` reads): which plan each objective
  would choose if the search were exhaustive.

Sets are measured grouped by their first k - 1 pairs, so the streams below the last pair are shared
(the Calibrator's stream cache). It prints the plans whose damage is at most --bound of --versus's,
and each objective's best plan on wiki.

    .venv/bin/python scripts/results/plan_census.py --model gemma3-270m --depth 15 --versus 8,12,14 \\
        --wiki-tokens 16384 --json docs/plan_census_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import combinations, groupby, pairwise
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lpconvert.archs import unpairable_starts  # noqa: E402
from lpconvert.errors import LPError, run_script  # noqa: E402
from lpconvert.outputs import write_json_atomically  # noqa: E402
from lpconvert.plan.layers import candidate_starts  # noqa: E402
from lpconvert.plan.measure import Calibrator  # noqa: E402
from lpconvert.plan.objectives import OBJECTIVE_NAMES  # noqa: E402
from lpconvert.runtime import text_windows  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402
from lpconvert.texts import resolve_text, tokenize_windows  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def every_plan(num_layers: int, pairs: int, unpairable: list[int]) -> list[tuple[int, ...]]:
    """Every set of `pairs` non-overlapping pairs that `plan` could choose (edge layers left out)."""
    starts = candidate_starts(num_layers, False, set(unpairable))
    return [c for c in combinations(starts, pairs) if all(b - a >= 2 for a, b in pairwise(c))]


def measure_all(calibrator: Calibrator, plans: list[tuple[int, ...]]) -> dict[tuple[int, ...], dict]:
    """{plan: every objective's value}, the plans measured in groups that share all but their last pair."""
    values = {}
    for base, group in groupby(sorted(plans), key=lambda plan: plan[:-1]):
        for m in calibrator.measure(list(group), base=base):
            values[m.pairs] = m.values
        log(f"  {len(values)}/{len(plans)} plans, {calibrator.forward_passes:.1f} forward passes")
    return values


def parse_pairs(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in (text or "").split(",") if p.strip())
    except ValueError:
        raise LPError(f"--versus {text} is not a list of pair starts", "give numbers, e.g. --versus 8,12,14") from None


def census(args) -> dict:
    source = resolve_model(args.model)
    num_layers = source.config.num_hidden_layers
    if not num_layers // 2 <= args.depth < num_layers:
        raise LPError(f"--depth {args.depth} does not fit {source.name}'s {num_layers} layers",
                      f"give a depth from {num_layers // 2} to {num_layers - 1}")
    plans = every_plan(num_layers, num_layers - args.depth, unpairable_starts(source.config))
    versus = parse_pairs(args.versus)
    if versus not in plans:
        raise LPError(f"--versus {args.versus} is not a plan of {num_layers - args.depth} pairs that fits "
                      f"{source.name}", f"give pair starts such as {','.join(map(str, plans[0]))}" if plans else
                      "give a depth with room for pairs")
    log(f"{len(plans)} plans of {num_layers - args.depth} pairs on {source.name}")
    torch.manual_seed(0)
    model = source.load_model(dtype=DTYPES[args.dtype], device="cpu")
    tokenizer = source.load_tokenizer()
    news = tokenize_windows(tokenizer, resolve_text("news"), seq_len=args.seq_len, num_tokens=None, seed=0,
                            split="all").input_ids[::args.news_every]
    started = time.perf_counter()
    log(f"news: {news.shape[0]} windows")
    on_news = Calibrator(model, news, objective="loss", batch_size=args.batch_size)
    news_values = measure_all(on_news, plans)
    texts = {"news": {"windows": int(news.shape[0]), "tokens": int(news.numel()), "every": args.news_every,
                      "source": on_news.base["calib"].values, "forward_passes": round(on_news.forward_passes, 1)}}
    wiki_values = {}
    if args.wiki_tokens:
        _, wiki = text_windows(tokenizer, "wiki", tokens=args.wiki_tokens, seq_len=args.seq_len, seed=0, split="calib")
        log(f"wiki calibration: {wiki.input_ids.shape[0]} windows")
        on_wiki = Calibrator(model, wiki.input_ids, objective="loss", batch_size=args.batch_size)
        wiki_values = measure_all(on_wiki, plans)
        texts["wiki_calibration"] = {"tokens": int(wiki.input_ids.numel()), "source": on_wiki.base["calib"].values,
                                     "forward_passes": round(on_wiki.forward_passes, 1)}
    source_ppl = math.exp(texts["news"]["source"]["loss"])
    versus_increase = math.exp(news_values[versus]["loss"]) - source_ppl
    rows = []
    for plan in plans:
        ppl = math.exp(news_values[plan]["loss"])
        rows.append({"pairs": list(plan), "news_perplexity": round(ppl, 3),
                     "damage_vs_versus": round((ppl - source_ppl) / versus_increase, 4),
                     "news": {k: round(v, 6) for k, v in news_values[plan].items()},
                     **({"wiki": {k: round(v, 6) for k, v in wiki_values[plan].items()}} if wiki_values else {})})
    rows.sort(key=lambda r: r["news_perplexity"])
    return {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]), "model": args.model,
            "depth": args.depth, "dtype": args.dtype, "versus": list(versus), "bound": args.bound,
            "source_news_perplexity": round(source_ppl, 3), "texts": texts, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads()}


def best_by_objective(result: dict) -> dict[str, dict]:
    """Each objective's best plan on wiki's calibration windows (what an exhaustive search would choose)."""
    rows = [r for r in result["rows"] if "wiki" in r]
    return {name: min(rows, key=lambda r: r["wiki"][name]) for name in OBJECTIVE_NAMES} if rows else {}


def markdown(result: dict, shown: int) -> str:
    wiki = "wiki" in result["rows"][0]
    lines = [f"{result['model']} at {result['depth']} blocks: {len(result['rows'])} plans; news perplexity "
             f"(source {result['source_news_perplexity']}), damage as a share of {tuple(result['versus'])}'s", "",
             "| pairs | news ppl | damage vs versus | news top1 |" + (" wiki copy_loss | wiki top1 |" if wiki else ""),
             "|---|---|---|---|" + ("---|---|" if wiki else "")]
    versus = result["versus"]
    for row in result["rows"]:
        if row["damage_vs_versus"] <= result["bound"] or row["pairs"] == versus or len(lines) < shown + 4:
            line = (f"| {','.join(map(str, row['pairs']))} | {row['news_perplexity']:.2f} | "
                    f"{row['damage_vs_versus']:.0%} | {row['news']['top1']:.4f} |")
            if wiki:
                line += f" {row['wiki']['copy_loss']:.4f} | {row['wiki']['top1']:.4f} |"
            lines.append(line)
    meeting = [r for r in result["rows"] if r["damage_vs_versus"] <= result["bound"]]
    lines += ["", f"{len(meeting)} plans do at most {result['bound']:.0%} of {tuple(versus)}'s damage: "
              + "; ".join(",".join(map(str, r["pairs"])) for r in meeting)]
    best = best_by_objective(result)
    if best:
        lines += ["", "| objective | best plan on wiki | its news damage |", "|---|---|---|"]
        lines += [f"| {name} | {','.join(map(str, r['pairs']))} | {r['damage_vs_versus']:.0%} |" for name, r in best.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--depth", type=int, default=15)
    parser.add_argument("--versus", help="the plan damage is measured against, e.g. 8,12,14 (needed unless --redraw)")
    parser.add_argument("--bound", type=float, default=0.75, help="the damage share a plan must stay within")
    parser.add_argument("--news-every", type=int, default=3)
    parser.add_argument("--wiki-tokens", type=int, default=0, help="also measure wiki's calibration windows (0: no)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--shown", type=int, default=15, help="rows of the table beyond those meeting --bound")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--redraw", action="store_true", help="only print the table of --json")
    args = parser.parse_args()
    if args.redraw:
        if args.json is None or not args.json.is_file():
            raise LPError(f"--redraw needs the JSON of an earlier run, and --json is {args.json}",
                          "give --json PATH of a plan_census.py run")
        result = json.loads(args.json.read_text())
    else:
        if args.json is not None and not args.json.resolve().parent.is_dir():  # before half an hour of measuring
            raise LPError(f"the folder of --json {args.json} does not exist", f"create {args.json.parent} first")
        result = census(args)
        if args.json is not None:
            write_json_atomically(args.json, result)
    print(markdown(result, args.shown))


if __name__ == "__main__":
    run_script(main)
