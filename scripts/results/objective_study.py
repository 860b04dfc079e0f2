"""Which plan objective predicts task accuracy? Rank correlation of each objective with benchmark accuracy.

For every plan of a task table (scripts/results/task_table.py --json: its rows' pairs and the accuracy
each converted model scored, item by item), measure every objective plan can minimise
(lpconvert/plan/objectives.py) on calibration text only, and compare the order the objective gives the
plans with the order their task accuracy gives them:

* Spearman's rho over all plans (they span depths, so depth alone orders much of it);
* within a depth (what plan decides: which pairs, for a given number of them): the share of same-depth
  plan pairs the objective orders as task accuracy does (concordance), counting only pairs whose
  accuracies differ.

Task accuracy is the average over the tasks the source answers clearly above chance (the task table's
`above_chance`). Objectives read wiki (calibration windows) and, for the calibration mix, the
calibration windows of news (`mix:*`, and `news:*` alone: whether an order holds on a second text); never a
benchmark item. Each objective costs one pass of its text per
plan; the per-pair metrics of a scores file (`--scores`, summed over a plan's pairs) cost none per plan.

    .venv/bin/python scripts/results/objective_study.py --model smollm2-135m --tasks-json docs/study_tasks_smollm2.json \\
        --scores /tmp/scores-smollm2.json --json docs/objective_study_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lpconvert.errors import run_script  # noqa: E402
from lpconvert.formats import PAIR_METRICS  # noqa: E402
from lpconvert.plan import build_calibrator  # noqa: E402
from lpconvert.plan.metrics import pair_values  # noqa: E402
from lpconvert.plan.objectives import OBJECTIVE_NAMES, with_combined  # noqa: E402
from lpconvert.score import spearman  # noqa: E402
from lpconvert.settings import PlanSettings  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402

SCORE_METRICS = ("loss_increase", "pair_cosine", "angular_distance", "pair_rel_l2")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def within_depth_concordance(plans: list[dict], objective: str) -> tuple[int, int]:
    """(same-depth plan pairs the objective orders as accuracy does, such pairs with different accuracies).
    Lower objective should mean higher accuracy."""
    agree = total = 0
    for a, b in combinations(plans, 2):
        if a["depth"] != b["depth"] or a["accuracy"] == b["accuracy"]:
            continue
        total += 1
        agree += (a["objectives"][objective] < b["objectives"][objective]) == (a["accuracy"] > b["accuracy"])
    return agree, total


def plans_of(tasks: dict) -> list[dict]:
    """The unhealed rows of a task table: pairs, depth, above-chance accuracy."""
    plans = []
    for row in tasks["rows"]:
        if len(row["row"].split("/")) > 2 or "pairs" not in row:
            continue
        average = row["average"].get("above_chance", row["average"])
        plans.append({"row": row["row"], "pairs": row["pairs"], "depth": row["depth"],
                      "accuracy": average["converted"], "difference": average["difference"],
                      "difference_stderr": average["difference_stderr"]})
    return plans


def measure(source, plans: list[dict], calib: str, tokens: int, label: str, cache: Path | None) -> tuple[list, dict, float]:
    """Every objective's value for each plan (and the source's), on `tokens` calibration tokens of `calib`;
    kept in `cache` (a JSON file) and read back from it by a later run."""
    kept = json.loads(cache.read_text()) if cache and cache.exists() else {}
    keys = [f"{source.name}|{calib}|{tokens}|{','.join(map(str, p['pairs']))}" for p in plans]
    base_key = f"{source.name}|{calib}|{tokens}|source"
    started = time.perf_counter()
    if any(k not in kept for k in [*keys, base_key]):
        settings = PlanSettings(calib=calib, tokens=tokens, verify=0, heldout_tokens=0)
        calibrator = build_calibrator(source, settings, progress=lambda m: log(f"{label}: {m}"))
        kept[base_key] = {"values": calibrator.base["calib"].values, "seconds": calibrator.seconds}
        for plan, key in zip(plans, keys, strict=True):
            if key not in kept:
                before = calibrator.seconds
                kept[key] = {"values": calibrator.measure([plan["pairs"]])[0].values,
                             "seconds": calibrator.seconds - before}
                log(f"{label}: {plan['row']} measured in {kept[key]['seconds']:.0f} s")
                if cache:
                    cache.write_text(json.dumps(kept))
        if cache:
            cache.write_text(json.dumps(kept))
    return [kept[k]["values"] for k in keys], kept[base_key]["values"], time.perf_counter() - started


def study(args) -> dict:
    source = resolve_model(args.model)
    tasks = json.loads(args.tasks_json.read_text())
    plans = plans_of(tasks)
    wiki, wiki_source, wiki_seconds = measure(source, plans, "wiki", args.tokens, "wiki", args.cache)
    news, news_source, news_seconds = measure(source, plans, "news", args.mix_tokens, "news (calibration windows)", args.cache)
    share = args.tokens / (args.tokens + args.mix_tokens)
    for plan, w, n in zip(plans, wiki, news, strict=True):
        w = with_combined(w)  # a cache may predate the combined objectives, or some others
        plan["objectives"] = {name: w[name] for name in OBJECTIVE_NAMES if name in w}
        plan["objectives"].update({f"mix:{name}": share * w[name] + (1 - share) * n[name]
                                   for name in ("kl", "loss", "copy_loss")})
        # the same objectives on a second text alone: does the order hold beyond one calibration sample?
        plan["objectives"].update({f"news:{name}": n[name] for name in ("top1", "kl", "loss", "miss") if name in n})
    objective_names = list(plans[0]["objectives"])
    if args.scores:
        scores = json.loads(args.scores.read_text())
        for metric in SCORE_METRICS:
            try:
                values = pair_values(scores, metric)
            except Exception:  # the scores file lacks this metric (loss_increase needs --measure-loss)
                continue
            shift = 1.0 if PAIR_METRICS[metric] == "high" else 0.0  # a cosine c counts as 1 - c: zero for no change
            for plan in plans:
                plan["objectives"][f"scores:{metric}"] = sum(values.get(p, float("inf")) + shift for p in plan["pairs"])
            objective_names.append(f"scores:{metric}")
    accuracy = [p["accuracy"] for p in plans]
    table = []
    for name in objective_names:
        values = [p["objectives"][name] for p in plans]
        agree, total = within_depth_concordance(plans, name)
        table.append({"objective": name, "spearman": -spearman(values, accuracy), "within_depth_agree": agree,
                      "within_depth_pairs": total,
                      "forward_passes_per_plan": 0 if name.startswith("scores:") else
                      (round((args.tokens + args.mix_tokens) / 4096, 2) if name.startswith("mix:") else
                       round(args.mix_tokens / 4096, 2) if name.startswith("news:") else round(args.tokens / 4096, 2))})
    return {"model": args.model, "command": " ".join(sys.argv), "tasks_json": str(args.tasks_json),
            "task_dtype": tasks.get("dtype", "float32"), "items_per_task": tasks["limit"],
            "wiki_tokens": args.tokens, "news_calibration_tokens": args.mix_tokens,
            "seconds": {"wiki": round(wiki_seconds), "news": round(news_seconds)},
            "source_objectives": {"wiki": wiki_source, "news": news_source},
            "plans": plans, "table": table}


def markdown(result: dict) -> str:
    lines = [f"{result['model']}: {len(result['plans'])} plans, task accuracy above chance "
             f"({result['items_per_task']} items per task, {result['task_dtype']})", "",
             "| objective | Spearman (all plans) | same-depth pairs ordered right | passes of 4,096 tokens per plan |",
             "|---|---|---|---|"]
    for row in sorted(result["table"], key=lambda r: -r["spearman"]):
        lines.append(f"| {row['objective']} | {row['spearman']:+.2f} | {row['within_depth_agree']}/{row['within_depth_pairs']} | "
                     f"{row['forward_passes_per_plan']} |")
    lines += ["", "| plan | pairs | above-chance accuracy | " + " | ".join(result["plans"][0]["objectives"]) + " |",
              "|---|---|---|" + "---|" * len(result["plans"][0]["objectives"])]
    for p in sorted(result["plans"], key=lambda p: (-p["depth"], -p["accuracy"])):
        lines.append(f"| {p['row']} | {','.join(map(str, p['pairs']))} | {100 * p['accuracy']:.1f} | "
                     + " | ".join(f"{v:.4g}" for v in p["objectives"].values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks-json", type=Path, required=True, help="scripts/results/task_table.py --json")
    parser.add_argument("--scores", type=Path, help="a scores file (lpconvert score): its per-pair metrics too")
    parser.add_argument("--tokens", type=int, default=8192, help="wiki calibration tokens")
    parser.add_argument("--mix-tokens", type=int, default=4096, help="news calibration tokens, for the mix")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cache", type=Path, help="a JSON file keeping the measurements, read back by a later run")
    parser.add_argument("--redraw", action="store_true", help="only print the tables from --json")
    args = parser.parse_args()
    if args.redraw:
        print(markdown(json.loads(args.json.read_text())))
        return
    result = study(args)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    run_script(main)
