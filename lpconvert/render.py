"""What people read: the Rich table each command prints, and the number formats they share.

Every function takes the JSON-shaped result a stage returns (the same data `--json` prints) and
returns a Rich renderable; nothing here computes a figure.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def format_count(n: int | None) -> str | None:
    """134_515_008 -> "134.5M"."""
    if n is None:
        return None
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def format_bytes(n: float | None) -> str | None:
    """538_090_408 -> "538.1 MB" (decimal units, like the Hub)."""
    if n is None:
        return None
    for size, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= size:
            return f"{n / size:.1f} {suffix}"
    return f"{n:.0f} B"


def pairs_text(pairs) -> str:
    """[10, 14] or [[10, 11], [14, 15]] -> "(10, 11), (14, 15)"."""
    starts = [p[0] if isinstance(p, (list, tuple)) else p for p in pairs]
    return ", ".join(f"({p}, {p + 1})" for p in starts) or "none"


# ----------------------------------------------------------------------------------------------
# inspect


def description_table(info: dict[str, Any]) -> Table:
    """A two-column table of describe.describe_model's dict."""
    table = Table(show_header=False, title=f"{info.get('name')}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    supported = "yes" if info.get("supported") else f"no — {info.get('unsupported_reason')}"
    rows: list[tuple[str, Any]] = [
        ("source", f"{info.get('kind')}: {info.get('path')}"),
        ("architecture", f"{info.get('architecture')} ({info.get('model_type')})"),
        ("supported", supported),
        ("layers", info.get("num_layers")),
    ]
    if "lp_blocks" in info:
        pairs = sum(1 for block in info["lp_blocks"] if len(block) > 1)
        rows.append(("effective depth", f"{info.get('effective_depth')} blocks ({pairs} layer-parallel pairs)"))
        rows.append(("blocks", " ".join("+".join(str(i) for i in block) for block in info["lp_blocks"])))
    rows += [
        ("hidden size", info.get("hidden_size")),
        ("attention heads", f"{info.get('num_attention_heads')} query, {info.get('num_key_value_heads')} key/value, "
                            f"head dim {info.get('head_dim')}"),
        ("MLP width", info.get("intermediate_size")),
        *([("layer kinds", f"global {', '.join(map(str, info['global_layers']))}; the others local (window "
                            f"{info.get('sliding_window')}); pairs join two of one kind")]
          if info.get("global_layers") else []),
        ("vocabulary", info.get("vocab_size")),
        ("tied embeddings", "yes" if info.get("tie_word_embeddings") else "no"),
        ("parameters", format_count(info.get("parameters"))),
        ("weights dtype", info.get("dtype")),
        ("size on disk", format_bytes(info.get("disk_bytes"))),
    ]
    for key, value in rows:
        table.add_row(key, "—" if value is None else str(value))
    return table


# ----------------------------------------------------------------------------------------------
# score


def scores_table(scores: dict) -> Table:
    measured = "loss_increase" in scores["pairs"][0]
    base = scores["base"]
    table = Table(title=f"{scores['model']['name']}: calibration loss {base['loss']:.3f} "
                        f"(perplexity {base['perplexity']:.2f}) on {base['tokens']} tokens of "
                        f"{scores['calibration']['source']}")
    table.add_column("pair", justify="right")
    table.add_column("angular dist.", justify="right")
    if "pair_rel_l2" in scores["pairs"][0]:
        table.add_column("pair error (rel. L2)", justify="right")
        table.add_column("pair cosine", justify="right")
    if measured:
        table.add_column("loss increase", justify="right")
    unpairable = set(scores.get("source", {}).get("unpairable", ()))
    for row in scores["pairs"]:
        mark = "*" if row["first"] in unpairable else ""
        cells = [f"{mark}({row['first']}, {row['first'] + 1})", f"{row['angular_distance']:.3f}"]
        if "pair_rel_l2" in row:
            cells += [f"{row['pair_rel_l2']:.3f}", f"{row['pair_cosine']:.3f}"]
        if measured:
            cells.append(f"{100 * row['loss_increase']:+.1f}%")
        table.add_row(*cells)
    safest = "; ".join(f"{m}: {', '.join(map(str, firsts))}" for m, firsts in scores["safest_pairs"].items())
    table.caption = f"safest pair starts by metric: {safest}"
    if unpairable:
        table.caption += "\n*: a local and a global layer, never paired (their masks and rotary bases differ)"
    if scores.get("agreement_with_loss"):
        table.caption += "\nSpearman with measured loss (middle pairs): " + ", ".join(
            f"{m} {rho:+.2f}" for m, rho in scores["agreement_with_loss"].items())
    table.caption += f"\ntime: {scores['timings']['total_seconds']:.0f} s"
    return table


# ----------------------------------------------------------------------------------------------
# plan


def plan_table(plan: dict, name: str, layer_strip: str, alpha: float) -> Table:
    """The plan JSON (formats.Plan.to_json) as a table; `alpha` is the cost model's constant."""
    d = plan["details"]
    table = Table(title=f"Plan: {plan['strategy']}", show_header=False)
    table.add_row("source", f"{name} ({plan['source'].get('architecture')}, {plan['source']['num_layers']} layers)")
    how = plan["strategy"] + (f", ranked by {plan['metric']}" if plan["metric"] else "")
    if d.get("objective"):
        how += f", measured by {d['objective']}"
    if "search" in d:
        s = d["search"]
        how += f" (pool {s['candidates']}, beam {s['beam']}, held-out check of {s['verify']})"
    table.add_row("strategy", how)
    target = plan["target"] or {}
    table.add_row("target", f"{target.get('kind', '').replace('_', ' ')} {target.get('value')}")
    table.add_row("pairs", ", ".join(f"({a}, {b})" for a, b in plan["pairs"]))
    table.add_row("layer stack", layer_strip)
    table.add_row("effective depth", f"{plan['effective_depth']} blocks (from {plan['source']['num_layers']})")
    table.add_row("speedup", f"{d['estimated_speedup']:.2f}x (estimate: decode time ∝ layers − {alpha}·pairs)")
    if "calibration" in d:
        c, base = d["calibration"], d["source_calibration"]
        table.add_row("calibration", f"perplexity {base['perplexity']:.2f} → {c['perplexity']:.2f} "
                                     f"(loss {100 * c['loss_increase']:+.1f}%), KL {c['kl']:.4f}")
    if "heldout" in d:
        h = d["heldout"]
        table.add_row("held-out check", f"perplexity {h['source_perplexity']:.2f} → {h['perplexity']:.2f} "
                                        f"(loss {100 * h['loss_increase']:+.1f}%)")
    if "summed_single_pair_loss_increase" in d:
        table.add_row("single-pair losses", f"{100 * d['summed_single_pair_loss_increase']:+.1f}% summed "
                                            "(pairs interact: an estimate)")
    cost = d.get("cost", {})
    if cost.get("set_evaluations"):
        table.add_row("cost", f"{cost['set_evaluations']} sets measured ({cost['heldout_evaluations']} on held-out), "
                              f"{cost['forward_passes']:.1f} forward passes of {cost['calibration_tokens']} tokens")
    table.add_row("time", f"{d['planning_seconds']:.1f} s")
    return table


# ----------------------------------------------------------------------------------------------
# export


def export_table(report: dict, source: str, layer_strip: str) -> Table:
    """export.ExportReport.to_json() as a table."""
    dry_run = report["dry_run"]
    table = Table(title="Dry run: nothing written" if dry_run else f"Exported to {report['out']}", show_header=False)
    table.add_row("source", source)
    table.add_row("pairs", pairs_text(report["pairs"]))
    table.add_row("layer stack", layer_strip)
    table.add_row("effective depth", f"{report['effective_depth']} blocks (from {report['num_layers']})")
    table.add_row("GGUF type" if report.get("format") == "gguf" else "dtype", report["dtype"])
    table.add_row("file" if report.get("format") == "gguf" else "shards", "\n".join(f"{s['file']}  {format_bytes(s['bytes'])}  ({s['tensors']} tensors)"
                                      for s in report["shards"]))
    table.add_row("total", format_bytes(report["total_bytes"]))
    if not dry_run:
        table.add_row("time", f"{report['seconds']:.1f} s")
        if report.get("format") == "gguf":
            from .llamacppworker import cpu_has_amx

            # llama.cpp's repacked q8_0 kernels crash on AMX CPUs (docs/gguf.md): say the flag where it matters
            amx = "  (this CPU has AMX: add -nr, --no-repack)" if report["dtype"] == "q8_0" and cpu_has_amx() else ""
            table.add_row("run with", f"llama-cli -m {report['out']}   (llama.cpp, architecture deci){amx}")
        else:
            table.add_row("load with", f'AutoModelForCausalLM.from_pretrained("{report["out"]}", trust_remote_code=True)')
    return table


def heal_table(report: dict) -> Table:
    """heal.HealResult.report as a table: one row per pair, held-out perplexity before and after."""
    ppl = report["heldout_perplexity"]
    calib = report["calibration"]
    table = Table(title=f"Heal ({report['method']}, target {report['settings']['target']}) of {report['source']['name']}: "
                        f"fitted on {calib['tokens']} tokens of {calib['source']}, judged on {ppl['tokens']} "
                        "held-out tokens")
    for column in ("pair", "kept", "damping", "calib. residual", "held-out ppl before → after", "time"):
        table.add_column(column, justify="left" if column == "pair" else "right")
    for row in report["pairs"]:
        a, b = row["pair"]
        table.add_row(f"({a}, {b})", "yes" if row["accepted"] else "[yellow]no[/]", f"{row['damping']:g}",
                      f"{row['calib_residual_before']:.3f} → {row['calib_residual_after']:.3f}",
                      f"{math.exp(row['heldout_loss_before']):.3f} → {math.exp(row['heldout_loss_after']):.3f}",
                      f"{row['seconds']:.0f} s")
    distill = report.get("distill")
    if distill:
        table.add_row("distill", "yes" if distill["best_step"] else "[yellow]no[/]", f"lr {distill['lr']:g}",
                      f"{distill['steps']} steps",
                      f"{math.exp(distill['heldout_loss_before']):.3f} → {math.exp(distill['heldout_loss_after']):.3f}",
                      f"{distill['seconds']:.0f} s")
    table.add_section()
    table.add_row("model", "", "", "", f"{ppl['unhealed']:.3f} → {ppl['healed']:.3f}",
                  f"{report['seconds']:.0f} s")
    table.caption = (f"{len(report['tensors'])} tensors replaced; peak memory "
                     f"{format_bytes(report['peak_memory_bytes'])}")
    return table


# ----------------------------------------------------------------------------------------------
# eval and convert


def eval_table(report: dict) -> Table:
    text = report["text"]
    table = Table(title=f"{report['converted']} ({report['converted_depth']} blocks) vs {report['source']} "
                        f"({report['source_depth']} layers) on {report['tokens']} tokens of {text['source']} "
                        f"({text['split']})")
    table.add_column("figure")
    table.add_column("source", justify="right")
    table.add_column("converted", justify="right")
    table.add_row("perplexity", f"{report['perplexity_source']:.3f}", f"{report['perplexity_converted']:.3f}")
    table.add_row("perplexity increase", "", f"{100 * report['perplexity_increase']:+.2f}%")
    table.add_row("next-token agreement", "", f"{report['agreement']:.3f}")
    kl = report["kl_divergence"]
    table.add_row("KL(source || converted), nats/token", "", "not measured" if kl is None else f"{kl:.4f}")
    generation = report["generation"]
    if generation["source"] is not None:
        table.add_row(f"generation: {generation['prompt']!r}", " ".join(generation["source"].split()),
                      " ".join(generation["converted"].split()))
    gate = [f"{k}={v}" for k, v in report["gate"].items() if v is not None]
    table.caption = ("gate: " + ", ".join(gate) + (" passed" if report["passed"] else " FAILED")) if gate else None
    return table


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _plus_minus(value: float, stderr: float | None, signed: bool = False) -> str:
    """A percentage with its standard error (none from a single item)."""
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text if stderr is None else f"{text}±{100 * stderr:.1f}"


def _accuracy(figure: dict) -> str:
    return _plus_minus(figure["accuracy"], figure["stderr"])


def tasks_table(report: dict) -> Table:
    """Accuracy per task in the paper's terms: each model's (± standard error), retained %, the paired
    difference (± its standard error) and agreement; then the average and the gate."""
    counts = sorted({row["items"] for row in report["tasks"]})
    items = f"{counts[0]} items per task" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} items per task"
    table = Table(title=f"{report['converted']} ({report['converted_depth']} blocks) vs {report['source']} "
                        f"({report['source_depth']} layers): task accuracy %, {items}")
    table.add_column("task", no_wrap=True)
    for column in ("source", "converted", "retained", "difference", "agree"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report["tasks"]:
        table.add_row(row["title"] + ("*" if row["metric"] == "acc_norm" else ""), _accuracy(row["source"]),
                      _accuracy(row["converted"]), _percent(row["retained"]),
                      _plus_minus(row["difference"], row["difference_stderr"], signed=True),
                      f"{100 * row['agreement']:.0f}")
    average = report["average"]
    table.add_row("[bold]average[/]", f"{100 * average['source']:.1f}", f"{100 * average['converted']:.1f}",
                  f"[bold]{_percent(average['retained'])}[/]",
                  _plus_minus(average["difference"], average["difference_stderr"], signed=True), "")
    clear = average.get("above_chance")
    if clear:
        table.add_row(f"above chance ({clear['tasks']})", f"{100 * clear['source']:.1f}", f"{100 * clear['converted']:.1f}",
                      _percent(clear["retained"]), _plus_minus(clear["difference"], clear["difference_stderr"], signed=True), "")
    notes = ["accuracy (acc; *: acc_norm, per character of the choice) ± one standard error; difference: "
             "converted - source on the same items; agree: % of items where both picked the same choice "
             "(LAMBADA: the same outcome)"]
    if clear:
        titles = {row["task"]: row["title"] for row in report["tasks"]}
        notes.append(f"above chance: the tasks the source answers more than 2 standard errors better than by "
                     f"guessing ({', '.join(titles[name] for name in clear['names'])})")
    notes += [f"{row['title']} perplexity of the last word: {row['perplexity']['source']:.2f} -> "
              f"{row['perplexity']['converted']:.2f}" for row in report["tasks"] if "perplexity" in row]
    gate = report["gate"]["min_retained"]
    if gate is not None:
        notes.append(f"gate: min_retained={100 * gate:.1f}% " + ("passed" if report["passed"] else "FAILED"))
    table.caption = "\n".join(notes)
    return table


def task_list_table(listing: dict) -> Table:
    table = Table(title="benchmark tasks (lpconvert eval --tasks NAME,...; core: the set --tasks core scores)")
    for column in ("task", "title", "metric", "items", "split", "core", "note"):
        table.add_column(column, justify="right" if column == "items" else "left")
    for task in listing["tasks"]:
        table.add_row(task["task"], task["title"], task["metric"], f"{task['items']:,}", task["split"],
                      "yes" if task["core"] else "", task["note"])
    table.caption = ("in lm-evaluation-harness: task lp_NAME, group lp_core; "
                     f"lm_eval --include_path {listing['include_path']}")
    return table


# ----------------------------------------------------------------------------------------------
# bench


def bench_table(report: dict) -> Table:
    s = report["settings"]
    table = Table(title=f"tokens/s on {report.get('gpu', report['device'])} ({s['dtype']}, prompt {s['prompt_len']}, "
                        f"{s['new_tokens']} new tokens, median of {s['repeats']})")
    for column in ("model", "batch", "mode", "decode tok/s", "prefill tok/s", "decode speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    gains = {(g["model"], g["batch"], g["mode"]): g["decode"] for g in report["speedups"]}
    for row in report["rows"]:
        gain = gains.get((row["model"], row["batch"], row["mode"]))
        table.add_row(row["model"], str(row["batch"]), row["mode"], f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['prefill_tokens_per_s']:.0f}", f"{gain:.2f}x" if gain else "")
    counted = report.get("collectives_per_step")
    if counted:  # vLLM with tensor parallelism: what each forward step exchanges between devices
        table.caption = "collectives per forward step: " + "; ".join(
            f"{model} " + ", ".join(f"{count:g} {name}" for name, count in counts.items())
            for model, counts in counted.items())
    return table
