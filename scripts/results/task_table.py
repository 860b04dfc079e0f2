"""Task table: benchmark accuracy of SmolLM2-135M and its conversions, through lm-evaluation-harness.

Every row is made the way a user makes it (`lpconvert export`, and `lpconvert heal` for the healed
rows, each in its own process) and scored with lpconvert's task definitions on the same fixed, seeded
subset of each task's items (`lpconvert eval --tasks core --limit N` picks the same ones). The source
answers once; each conversion is compared with it item by item (lpconvert.accuracy.compare_task).

    .venv/bin/python scripts/results/task_table.py                          # the table in docs/tasks.md (about an hour)
    .venv/bin/python scripts/results/task_table.py --limit 20 --rows 27/contiguous --json /tmp/t.json   # a quick look
    .venv/bin/python scripts/results/task_table.py --redraw                 # the table again from --json
    .venv/bin/python scripts/results/task_table.py --model gemma3-270m --plans-from docs/quality_front_gemma3.json \
        --rows 16/contiguous,16/search,15/contiguous,15/search,15/search/lsq --json docs/tasks_gemma3.json \
        --plot docs/tasks_gemma3.png

On a GPU, every item of every task (the command docs/tasks.md gives):

    .venv/bin/python scripts/results/task_table.py --full --device cuda --batch-size 64 --json tasks-full.json

Rows: depth/plan[/heal method]. Plans are the pairs the CLI's defaults chose (docs/quality.md), or
explicit pair starts joined by dashes (`15/6-12-15`). With `--cache DIR` each model's answers are kept
there and reused by a later run with the same settings (so rows can be added, or run in parallel jobs).
The JSON keeps every item's outcome (`answers`: 1 right, 0 wrong, per task in item order), so two rows
can be compared item by item later (scripts/results/objective_study.py does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from smollm2_plans import plans_from  # noqa: E402  (the pairs the CLI's defaults chose: docs/quality.md)

from lpconvert.accuracy import (  # noqa: E402
    ABOVE_CHANCE_BY,
    CORE,
    TASKS,
    _mean_stderr,
    answer_tasks,
    chance_levels,
    compare_task,
    item_lists,
    summarize,
)
from lpconvert.errors import run_script  # noqa: E402
from lpconvert.export import plan_for_pairs  # noqa: E402
from lpconvert.plots import check_plot_path, pyplot, save_figure  # noqa: E402
from lpconvert.settings import TaskSettings  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402

DEFAULT_ROWS = "27/contiguous,27/search,25/contiguous,25/search,25/search/lsq,25/search/distill"
DEFAULT_JSON, DEFAULT_PLOT = ROOT / "docs" / "tasks.json", ROOT / "docs" / "tasks.png"  # the table of docs/tasks.md
HEAL_OPTIONS = {"lsq": [], "distill": ["--tokens", "32768"]}  # distill as docs/quality.md recommends


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lpconvert(*arguments: str) -> None:
    command = [str(ROOT / ".venv/bin/lpconvert"), "--progress", "lines", *arguments]
    log("$ lpconvert " + " ".join(arguments))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"lpconvert {arguments[0]} failed ({done.returncode}): {done.stderr[-2000:]}")


def build_row(model: str, plans: dict, row: str, work: Path, device: str, heal_options: list[str]) -> Path:
    """The converted model of one row, exported (and healed) by the CLI into `work`."""
    depth, plan_name, *heal = row.split("/")
    plan_path = work / f"plan-{depth}-{plan_name}.json"
    plan_for_pairs(resolve_model(model), row_pairs(plans, row)).save(plan_path)
    out = work / row.replace("/", "-")
    extra = []
    if heal:
        heal_path = work / f"heal-{row.replace('/', '-')}.safetensors"
        lpconvert("heal", model, "--plan", str(plan_path), "-o", str(heal_path), "--method", heal[0],
                  "--device", device, *HEAL_OPTIONS[heal[0]], *heal_options)
        extra = ["--heal", str(heal_path)]
    lpconvert("export", model, "--plan", str(plan_path), "-o", str(out), *extra)
    return out


def row_pairs(plans: dict, row: str) -> list[int]:
    """The pair starts of a row: explicit (`15/6-12-15`) or a named plan's (`15/search`)."""
    depth, plan_name = row.split("/")[:2]
    if re.fullmatch(r"\d+(-\d+)*", plan_name):
        return [int(p) for p in plan_name.split("-")]
    return plans[(int(depth), plan_name)]


def cached_answers(cache: Path | None, key: dict, make) -> dict:
    """make() -> answers, kept in `cache` under a hash of everything that decides them."""
    if cache is None:
        return make()
    path = cache / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    if path.exists():
        log(f"{key['row']}: answers from {path}")
        return json.loads(path.read_text())["answers"]
    answers = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "answers": answers}))
    tmp.replace(path)
    return answers


def outcomes(answers: dict, names: list[str]) -> dict:
    """Each task's per-item outcome, 1 right and 0 wrong, in item order."""
    return {name: [int(a["correct"]) for a in answers[name]] for name in names}


def answers_of(model_source, names, items, settings: TaskSettings, label: str) -> dict:
    started = time.perf_counter()
    model = model_source.load_model(dtype=getattr(torch, settings.dtype), device=settings.device)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            log(f"{label}: {done}/{total} requests")

    answers = answer_tasks(model, model_source.load_tokenizer(), names, items, settings.batch_size, progress)
    log(f"{label}: answered in {time.perf_counter() - started:.0f} s")
    return answers


def table(result: dict) -> str:
    """Markdown: accuracy per task and model (± standard error), the average, and retained %."""
    names = result["tasks"]
    source = result["source"]
    head = ["model", "blocks"] + [f"{TASKS[n].title} ({TASKS[n].metric})" for n in names] + \
        ["average", "retained %", "difference (paired)", "above chance: retained %", "difference", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| source | {result.get('num_layers', 30)} | " + " | ".join(
        f"{100 * source[n]['accuracy']:.1f} ± {100 * source[n]['stderr']:.1f}" for n in names)
        + f" | {100 * result['source_average']:.1f} | 100 | | | | |")
    for row in result["rows"]:
        cells = []
        for task in row["tasks"]:
            cells.append(f"{100 * task['converted']['accuracy']:.1f} ({100 * task['difference']:+.1f} ± "
                         f"{100 * task['difference_stderr']:.1f})")
        average = row["average"]
        lines.append(f"| {row['row']} | {row['depth']} | " + " | ".join(cells) +
                     f" | {100 * average['converted']:.1f} | {100 * average['retained']:.1f} | "
                     f"{100 * average['difference']:+.1f} ± {100 * average['difference_stderr']:.1f} | "
                     + (f"{100 * clear['retained']:.1f} | {100 * clear['difference']:+.1f} ± "
                        f"{100 * clear['difference_stderr']:.1f} | " if (clear := average.get("above_chance")) else " | | ")
                     + f"{100 * sum(t['agreement'] for t in row['tasks']) / len(row['tasks']):.0f}% |")
    clear = result["rows"][0]["average"].get("above_chance") if result["rows"] else None
    if clear:
        chance = result["rows"][0]["tasks"]
        lines += ["", "Above chance: the tasks the source answers more than "
                  f"{ABOVE_CHANCE_BY:g} standard errors better than guessing ({', '.join(TASKS[n].title for n in clear['names'])}); "
                  "chance on the items scored: " + ", ".join(f"{TASKS[t['task']].title} {100 * t['chance']:.1f}%" for t in chance)]
    with_ppl = [(r["row"], next(t for t in r["tasks"] if "perplexity" in t)["perplexity"]) for r in result["rows"]
                if any("perplexity" in t for t in r["tasks"])]
    if with_ppl:
        lines += ["", f"LAMBADA perplexity of the last word: source {with_ppl[0][1]['source']:.1f}; " +
                  ", ".join(f"{row} {ppl['converted']:.1f}" for row, ppl in with_ppl)]
    return "\n".join(lines)


def same_model(row: dict) -> tuple:
    """What makes two rows the same model, whatever they are named (25/contiguous is 25/18-20-22-24-26): the
    pairs and the healing."""
    return tuple(row["pairs"]), tuple(row["row"].split("/")[2:])


def versus(result: dict, baseline: str) -> str:
    """Markdown: each row against `baseline` (another row), item by item on the tasks above chance: the
    paired difference of the average accuracy, with its standard error."""
    rows = {row["row"]: row for row in result["rows"]}
    if baseline not in rows:
        raise SystemExit(f"--versus {baseline}: no such row (rows: {', '.join(rows)})")
    base = rows[baseline]
    names = base["average"].get("above_chance", {}).get("names") or result["tasks"]
    lines = [f"| row | against {baseline}: above-chance accuracy difference (points, paired) |", "|---|---|"]
    for label, row in rows.items():
        if label == baseline or "answers" not in row:
            continue
        per_task = [_mean_stderr([a - b for a, b in zip(row["answers"][name], base["answers"][name], strict=True)])
                    for name in names]  # the same paired difference compare_task computes against the source
        mean = sum(m for m, _ in per_task) / len(per_task)
        stderr = sum(se ** 2 for _, se in per_task) ** 0.5 / len(per_task)
        lines.append(f"| {label} | {100 * mean:+.1f} ± {100 * stderr:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """The paired difference per task (converted - source, percentage points, ± one standard error), a
    group of bars per task and one bar per row, then the averages (all tasks, and above chance)."""
    plt = pyplot()
    names = result["tasks"]
    clear = bool(rows := result["rows"]) and "above_chance" in rows[0]["average"]
    labels = [TASKS[name].title.removesuffix("-OpenAI") for name in names] + ["average"] + (["above chance"] if clear else [])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 5.2))
    colors = plt.cm.tab10.colors
    for i, row in enumerate(rows):
        averages = [row["average"]] + ([row["average"]["above_chance"]] if clear else [])
        values = [100 * t["difference"] for t in row["tasks"]] + [100 * a["difference"] for a in averages]
        errors = [100 * t["difference_stderr"] for t in row["tasks"]] + [100 * a["difference_stderr"] for a in averages]
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, yerr=errors, capsize=2, color=colors[i % len(colors)],
               label=f"{row['row']} ({100 * row['average']['retained']:.1f}% retained"
                     + (f", {100 * row['average']['above_chance']['retained']:.1f}% above chance)" if clear else ")"))
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy: converted - source (points)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    count = f"{result['limit']} items per task" if result["limit"] else "every item"
    name = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}.get(result.get("model", "smollm2-135m"))
    ax.set_title(f"{name or result['model']}: accuracy change per task, paired on the same items ({count}), ± 1 s.e.")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plans-from", type=Path, help="a quality front's JSON (scripts/results/quality_front.py --out): "
                        "its plans, instead of SmolLM2's")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="depth/plan[/lsq|distill], comma-separated")
    parser.add_argument("--tasks", default=",".join(CORE))
    parser.add_argument("--limit", type=int, default=200, help="items per task (a seeded sample)")
    parser.add_argument("--full", action="store_true", help="every item of every task (for a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="how the models answer (bfloat16 is about 4x faster on a CPU with AMX)")
    parser.add_argument("--cache", type=Path, help="keep each model's answers here, and reuse them")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=Path, help=f"default: {DEFAULT_PLOT.relative_to(ROOT)} with the default --json, "
                        "else none (a look at another run leaves the docs' figure alone)")
    parser.add_argument("--heal-options", default="", help="extra options for lpconvert heal (as scripts/results/heal_front.py), "
                        "e.g. '--tokens 8192 --damping 0.1,0.3,1'")
    parser.add_argument("--redraw", action="store_true", help="only print the table and draw --plot from --json")
    parser.add_argument("--versus", help="with --redraw: every row against this row, item by item")
    parser.add_argument("--merge", type=Path, nargs="+", help="with --redraw: add these runs' rows (same model, "
                        "tasks, items and dtype) to --json's")
    args = parser.parse_args()
    if args.plot is None and args.json == DEFAULT_JSON:
        args.plot = DEFAULT_PLOT
    if args.plot:
        check_plot_path(args.plot)  # before an hour of work
    if args.redraw:
        result = json.loads(args.json.read_text())
        for other in map(json.loads, map(Path.read_text, args.merge or [])):
            same = ("model", "tasks", "limit", "seed", "dtype", "items")
            if any(other.get(k) != result.get(k) for k in same):
                raise SystemExit(f"--merge: the runs differ in one of {', '.join(same)}")
            known = {same_model(row) for row in result["rows"]}
            result["rows"] += [row for row in other["rows"] if same_model(row) not in known]
        if args.merge:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        if args.versus:
            print()
            print(versus(result, args.versus))
        if args.plot:
            plot(result, args.plot)
        return
    started = time.perf_counter()
    names = args.tasks.split(",")
    settings = TaskSettings(tasks=args.tasks, limit=None if args.full else args.limit, seed=args.seed,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    items = item_lists(names, settings)
    chance = chance_levels(names, items)
    source = resolve_model(args.model)
    plans = plans_from(args.plans_from)
    key = {"model": args.model, "tasks": names, "limit": settings.limit, "seed": args.seed, "dtype": args.dtype,
           "batch_size": args.batch_size}
    source_answers = cached_answers(args.cache, {**key, "row": "source"},
                                    lambda: answers_of(source, names, items, settings, "source"))
    source_rows = {name: compare_task(name, source_answers[name], source_answers[name])["source"] for name in names}
    result = {"model": args.model, "num_layers": source.config.num_hidden_layers, "command": " ".join(sys.argv),
              "tasks": names, "limit": settings.limit, "seed": args.seed, "items": items,
              "dtype": args.dtype, "source": source_rows, "source_answers": outcomes(source_answers, names),
              "source_average": sum(r["accuracy"] for r in source_rows.values()) / len(names),
              "rows": []}
    work = Path(tempfile.mkdtemp(prefix="task-table-"))
    for row in args.rows.split(","):
        built = time.perf_counter()
        pairs = row_pairs(plans, row)

        def answer(row=row):
            converted = resolve_model(str(build_row(args.model, plans, row, work, args.device, args.heal_options.split())))
            return answers_of(converted, names, items, settings, row)

        answers = cached_answers(args.cache, {**key, "row": row, "pairs": pairs, "heal_options": args.heal_options}, answer)
        rows = [compare_task(name, source_answers[name], answers[name], chance[name]) for name in names]
        result["rows"].append({"row": row, "pairs": pairs, "depth": source.config.num_hidden_layers - len(pairs),
                               "tasks": rows, "average": summarize(rows), "answers": outcomes(answers, names),
                               "seconds": round(time.perf_counter() - built)})
        log(f"{row}: average retained {100 * result['rows'][-1]['average']['retained']:.1f}%")
        result["seconds"] = round(time.perf_counter() - started)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    run_script(main)  # a bad --plot path: one line and exit 2, as the CLI says it
