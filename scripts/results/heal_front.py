"""Heal front: how much of the quality a plan's pairs cost each heal method wins back, on SmolLM2-135M (or
another model: --model, with the plans of its quality front, --plans-from).

For each effective depth and plan (the contiguous rule and the default search, with the pairs they
chose in docs/quality.md), runs `lpconvert heal` as a user would (its own process: time and peak
memory are the command's), and measures perplexity of the source, the unhealed and each healed model
on two texts heal never reads:

* news: the first --news-windows windows of the built-in `news` text (300 articles);
* wiki held-out: held-out windows of the `wiki` calibration text *after* the ones heal uses to
  choose and accept its corrections (heal reads the first heldout_tokens / seq_len of them).

Recovered fraction of the gap = (ln ppl_unhealed - ln ppl_healed) / (ln ppl_unhealed - ln ppl_source).

    .venv/bin/python scripts/results/heal_front.py                                  # every row (about an hour)
    .venv/bin/python scripts/results/heal_front.py --depths 25 --plans search --methods lsq
    .venv/bin/python scripts/results/heal_front.py --distill-at 25/search           # distill only there
    .venv/bin/python scripts/results/heal_front.py --model gemma3-270m --plans-from docs/quality_front_gemma3.json \
        --depths 16,15,14 --json docs/heal_front_gemma3.json --plot docs/heal_front_gemma3.png

Targets (issue 16), 25 blocks with the default plan: lsq recovers at least 35% on each held-out text
and makes none worse, in at most 5 minutes on a 2-core CPU; distill at least 60% in at most 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from smollm2_plans import plans_from  # noqa: E402  (the pairs the CLI's defaults chose: docs/quality.md)

from lpconvert.errors import run_script  # noqa: E402
from lpconvert.export import plan_for_pairs  # noqa: E402
from lpconvert.healfile import corrections_of, load_heal_file  # noqa: E402
from lpconvert.plots import check_plot_path, pyplot, save_figure  # noqa: E402
from lpconvert.runner import LayerRunner  # noqa: E402
from lpconvert.settings import HealSettings  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402
from lpconvert.texts import resolve_text, tokenize_windows  # noqa: E402

SEQ_LEN = 512


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def eval_windows(tokenizer, news_windows: int, wiki_windows: int) -> dict[str, torch.Tensor]:
    news = tokenize_windows(tokenizer, resolve_text("news"), seq_len=SEQ_LEN, num_tokens=news_windows * SEQ_LEN,
                            seed=0, split="all").input_ids
    skip = HealSettings().heldout_tokens // SEQ_LEN  # the held-out windows heal itself reads
    wiki = tokenize_windows(tokenizer, resolve_text("wiki"), seq_len=SEQ_LEN, num_tokens=None, seed=0,
                            split="heldout").input_ids[skip:skip + wiki_windows]
    return {"news": news, "wiki_heldout": wiki}


def perplexity(runner: LayerRunner, ids: torch.Tensor, pairs: list[int], batch: int = 4) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            chunk = ids[start:start + batch]
            total, n = runner.nll(runner.run(runner.embed(chunk), pairs=pairs), chunk)
            nll, count = nll + total, count + n
    return math.exp(nll / count)


def run_heal(model: str, plan_path: Path, out: Path, method: str, extra: list[str]) -> dict:
    """`lpconvert heal` in its own process; its report (time, peak memory) as it wrote it."""
    command = [str(ROOT / ".venv/bin/lpconvert"), "--progress", "lines", "heal", model, "--plan",
               str(plan_path), "-o", str(out), "--method", method, "--device", "cpu", *extra]
    log("$ " + " ".join(command[1:]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"heal failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(out.with_suffix(".json").read_text())
    report["wall_seconds"] = time.perf_counter() - started
    return report


def recovered(unhealed: float, healed: float, source: float) -> float:
    return (math.log(unhealed) - math.log(healed)) / (math.log(unhealed) - math.log(source))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plans-from", type=Path, help="a quality front's JSON (scripts/results/quality_front.py --out): "
                        "its plans, instead of SmolLM2's")
    parser.add_argument("--depths", default="27,25,23")
    parser.add_argument("--plans", default="contiguous,search")
    parser.add_argument("--methods", default="lsq,distill")
    parser.add_argument("--distill-at", default="all", help="depth/plan rows that also run distill, e.g. 25/search")
    parser.add_argument("--news-windows", type=int, default=32)
    parser.add_argument("--wiki-windows", type=int, default=16)
    parser.add_argument("--heal-options", default="", help="extra options for lpconvert heal, e.g. '--tokens 32768'")
    parser.add_argument("--distill-options", default="", help="extra options for the distill rows only (after "
                        "--heal-options), e.g. '--tokens 32768 --steps 150'")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "heal_front.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "heal_front.png")
    parser.add_argument("--redraw", action="store_true", help="only draw --plot and print the table from --json")
    parser.add_argument("--merge", type=Path, help="put this run's rows (another --json) into --json in place of "
                        "the same depth/plan/method, then redraw")
    args = parser.parse_args()
    check_plot_path(args.plot)  # before an hour of work
    if args.merge:
        merge(args.json, args.merge)
    if args.redraw or args.merge:
        result = json.loads(args.json.read_text())
        print(table(result))
        plot(result, args.plot)
        return
    depths = [int(d) for d in args.depths.split(",")]
    plans = args.plans.split(",")
    methods = args.methods.split(",")
    distill_at = None if args.distill_at == "all" else {tuple(x.split("/")) for x in args.distill_at.split(",")}

    source = resolve_model(args.model)
    chosen = plans_from(args.plans_from)
    torch.manual_seed(0)
    runner = LayerRunner(source.load_model(dtype=torch.float32, device="cpu"), seq_len=SEQ_LEN)
    texts = eval_windows(source.load_tokenizer(), args.news_windows, args.wiki_windows)
    log("source perplexity")
    base = {name: perplexity(runner, ids, []) for name, ids in texts.items()}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="heal-front-"))
    for depth in depths:
        for plan_name in plans:
            pairs = chosen[(depth, plan_name)]
            plan = plan_for_pairs(source, pairs)
            plan_path = work / f"plan-{depth}-{plan_name}.json"
            plan.save(plan_path)
            runner.corrections = {}
            unhealed = {name: perplexity(runner, ids, pairs) for name, ids in texts.items()}
            rows.append({"depth": depth, "plan": plan_name, "pairs": pairs, "method": "unhealed", **unhealed})
            log(f"{depth}/{plan_name} unhealed: {unhealed}")
            for method in methods:
                if method == "distill" and distill_at is not None and (str(depth), plan_name) not in distill_at:
                    continue
                out = work / f"heal-{depth}-{plan_name}-{method}.safetensors"
                extra = args.heal_options.split() + (args.distill_options.split() if method == "distill" else [])
                report = run_heal(args.model, plan_path, out, method, extra)
                runner.corrections = corrections_of(load_heal_file(out).tensors, plan)
                healed = {name: perplexity(runner, ids, pairs) for name, ids in texts.items()}
                runner.corrections = {}
                row = {"depth": depth, "plan": plan_name, "pairs": pairs, "method": method, **healed,
                       **{f"recovered_{name}": recovered(unhealed[name], healed[name], base[name]) for name in texts},
                       "pairs_kept": sum(r["accepted"] for r in report["pairs"]),
                       "heal_seconds": report["seconds"], "wall_seconds": round(report["wall_seconds"], 1),
                       "peak_memory_bytes": report["peak_memory_bytes"],
                       "damping": [r["damping"] for r in report["pairs"]], "options": " ".join(extra)}
                rows.append(row)
                log(f"{depth}/{plan_name} {method}: {healed} recovered "
                    f"{row['recovered_news']:.1%} / {row['recovered_wiki_heldout']:.1%} in {report['seconds']} s")
                args.json.write_text(json.dumps({"model": args.model, "num_layers": source.config.num_hidden_layers,
                                                 "source": base, "rows": rows, "texts": _describe(texts)}, indent=1))
    result = {"model": args.model, "num_layers": source.config.num_hidden_layers, "command": " ".join(sys.argv),
              "source": base, "rows": rows, "texts": _describe(texts), "settings": {
        "heal_defaults": {k: v for k, v in HealSettings().__dict__.items()}, "heal_options": args.heal_options,
        "distill_options": args.distill_options}}
    args.json.write_text(json.dumps(result, indent=1, default=list) + "\n")
    print(table(result))
    if args.plot:
        plot(result, args.plot)


def merge(into: Path, other: Path) -> None:
    """Rows measured by separate runs (e.g. distill with its own options) in one table: the source and
    the texts must be the same."""
    result, added = json.loads(into.read_text()), json.loads(other.read_text())
    if result["texts"] != added["texts"] or any(abs(result["source"][k] - added["source"][k]) > 1e-6
                                                for k in result["source"]):
        raise SystemExit(f"{other} measured other texts or another source than {into}")
    key = lambda row: (row["depth"], row["plan"], row["method"])  # noqa: E731
    replaced = {key(row) for row in added["rows"]}
    result["rows"] = [row for row in result["rows"] if key(row) not in replaced] + added["rows"]
    result.setdefault("runs", []).append({"merged": other.name, "settings": added.get("settings")})
    into.write_text(json.dumps(result, indent=1, default=list) + "\n")


def _describe(texts: dict[str, torch.Tensor]) -> dict:
    return {name: {"windows": ids.shape[0], "tokens": ids.numel()} for name, ids in texts.items()}


def row_order(row: dict) -> tuple:
    """Deepest first, then the plan, then unhealed, lsq, distill (rows may come from several runs)."""
    return (-row["depth"], row["plan"], ["unhealed", "lsq", "distill"].index(row["method"]))


def table(result: dict) -> str:
    base = result["source"]
    lines = [f"Source perplexity: news {base['news']:.2f}, wiki held-out {base['wiki_heldout']:.2f}", "",
             "| depth | plan | method | news ppl | recovered | wiki held-out ppl | recovered | pairs kept | "
             "heal time | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=row_order):
        if r["method"] == "unhealed":
            lines.append(f"| {r['depth']} | {r['plan']} | unhealed | {r['news']:.2f} | | {r['wiki_heldout']:.2f} | "
                         f"| {len(r['pairs'])} pairs | | |")
            continue
        method = r["method"] + (f" `{r['options']}`" if r.get("options") else "")
        lines.append(f"| {r['depth']} | {r['plan']} | {method} | {r['news']:.2f} | {r['recovered_news']:.0%} | "
                     f"{r['wiki_heldout']:.2f} | {r['recovered_wiki_heldout']:.0%} | {r['pairs_kept']}/{len(r['pairs'])} "
                     f"| {r['heal_seconds']:.0f} s | {r['peak_memory_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    styles = {"unhealed": ("o", "-"), "lsq": ("s", "--"), "distill": ("^", ":")}
    colors = {"contiguous": "#dd8452", "search": "#4c72b0"}
    for ax, text in zip(axes, ("news", "wiki_heldout"), strict=True):
        for plan_name in colors:
            for method, (marker, line) in styles.items():
                points = sorted(((r["depth"], r[text]) for r in result["rows"]
                                 if r["plan"] == plan_name and r["method"] == method), reverse=True)
                if points:
                    ax.plot([result.get("num_layers", 30)] + [d for d, _ in points], [result["source"][text]] + [p for _, p in points],
                            marker=marker, linestyle=line, color=colors[plan_name], label=f"{plan_name}, {method}")
        ax.axhline(result["source"][text], color="gray", linewidth=0.8, linestyle=":")
        ax.invert_xaxis()
        ax.set_xlabel("effective depth (blocks)")
        ax.set_ylabel(f"perplexity ({text.replace('_', ' ')})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    name = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}.get(result.get("model", "smollm2-135m"))
    fig.suptitle(f"{name or result['model']}: perplexity against depth, unhealed and healed")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main)  # a bad --plot path: one line and exit 2, as the CLI says it
