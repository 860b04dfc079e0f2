"""Pictures, drawn only from the JSON files the stages write (so any of them can be redrawn later
from a scores or plan file): layer and pair importance (score), quality against depth (plan), healing
pair by pair (heal).

Every picture, the CLI's and scripts/results/'s, is written by `save_figure`: in the format its name ends in
(.png, .pdf or .svg; a name with nothing before the suffix, such as `.png`, is refused in one line),
atomically, and carrying PLOT_MARKER (a PNG text chunk, the SVG's dc:description, the PDF's Subject): that is
how lpconvert knows a picture at the --plot path is one it drew, which --overwrite may replace (`written_plot`).

matplotlib is imported when a picture is drawn, never at import.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from .errors import LPError
from .outputs import OwnedFile, atomic_output_file, check_file_name

FORMATS = ("png", "pdf", "svg")  # what --plot writes, by the file's extension (matplotlib's savefig)
PLOT_MARKER = "lpconvert-plot"
# Where each format keeps the marker (matplotlib's savefig metadata keys).
MARKER_KEYS = {"png": "Description", "svg": "Description", "pdf": "Subject"}
MAX_PLOT_BYTES = 256 * 2**20  # a plot is kilobytes; a larger file is not one
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def written_plot(path) -> bool:
    """A picture lpconvert drew: a PNG, SVG or PDF that carries PLOT_MARKER where lpconvert puts it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head == PNG_SIGNATURE:
                return _png_marked(f)
            if os.fstat(f.fileno()).st_size > MAX_PLOT_BYTES:
                return False
            data = head + f.read()
    except OSError:
        return False
    marker = PLOT_MARKER.encode()
    if data.startswith(b"%PDF-"):
        return b"/Subject (" + marker + b")" in data
    start = data[:8192]
    return b"<svg" in start and b"<dc:description>" + marker + b"</dc:description>" in start


def _png_marked(f) -> bool:
    """The PNG's text chunks before its image data hold Description = PLOT_MARKER."""
    for _ in range(1000):
        head = f.read(8)
        if len(head) < 8:
            return False
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"IEND"):
            return False
        if kind == b"tEXt" and length < 1 << 20:
            keyword, _, text = f.read(length).partition(b"\0")
            if keyword == MARKER_KEYS["png"].encode() and text == PLOT_MARKER.encode():
                return True
            f.seek(4, os.SEEK_CUR)
        else:
            f.seek(length + 4, os.SEEK_CUR)
    return False


def plot_output(example: str) -> OwnedFile:
    """The --plot output of a command, `example` the name its fixes suggest."""
    return OwnedFile("picture", tuple("." + f for f in FORMATS), example, written_plot,
                     f"write the picture outside any model folder, e.g. --plot {example}", option="--plot")


SCORES_PLOT, FRONT_PLOT, HEAL_PLOT = plot_output("scores.png"), plot_output("front.png"), plot_output("heal.png")
PICTURE = plot_output("plot.png")  # a picture of scripts/results/
STRATEGY_COLORS = {"contiguous": "tab:blue", "greedy": "tab:orange", "search": "tab:green"}  # in every plot


def pyplot():
    """matplotlib's pyplot, drawing off screen (Agg); without matplotlib, one line."""
    try:
        import matplotlib
    except ImportError:
        raise LPError("--plot needs matplotlib", "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(scores: dict, path, overwrite: bool | None = None) -> None:
    """Per-layer importance and per-pair cost in one picture. `overwrite` (the CLI's flag, checked before
    the work): what is at `path` is checked again just before it is replaced."""
    plt = pyplot()
    layers, pairs = scores["layers"], scores["pairs"]
    panels = 3 if "loss_increase" in pairs[0] else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels), sharex=True)
    ax = axes[0]
    xs = [row["layer"] for row in layers]
    ax.bar(xs, [row["block_influence"] for row in layers], color="#4c72b0", label="block influence (1 - cos)")
    ax.plot(xs, [row["angular_distance"] for row in layers], "o-", color="#dd8452", label="angular distance")
    ax.set_ylabel("per layer")
    ax.legend(loc="upper center")
    ax.set_title(f"{scores['model']['name']}: layer and pair importance "
                 f"({scores['calibration']['tokens']} tokens of {scores['calibration']['source']})")
    ax = axes[1]
    px = [row["first"] + 0.5 for row in pairs]
    if "pair_rel_l2" in pairs[0]:
        ax.plot(px, [row["pair_rel_l2"] for row in pairs], "o-", color="#c44e52", label="pair error (relative L2)")
        ax.plot(px, [1 - row["pair_cosine"] for row in pairs], "s--", color="#8172b3", label="1 - pair cosine")
    ax.plot(px, [row["angular_distance"] for row in pairs], "^:", color="#55a868", label="angular distance (2 layers)")
    ax.set_yscale("log")
    ax.set_ylabel("per pair (i, i+1)")
    ax.legend(loc="upper center")
    if panels == 3:
        ax = axes[2]
        ax.bar(px, [100 * row["loss_increase"] for row in pairs], color="#937860")
        ax.set_yscale("symlog", linthresh=1.0)  # a few pairs cost 100x more than the rest
        ax.set_ylabel("loss increase, % (measured)")
    axes[-1].set_xlabel("layer")
    fig.tight_layout()
    save_figure(fig, path, overwrite, SCORES_PLOT)


def plot_front(plan_json: dict, scores: dict, path, overwrite: bool | None = None) -> None:
    """The quality/depth front of a plan (its JSON) and the scores it was made from, a picture: calibration
    perplexity against effective depth, measured for the plan's strategy, estimated for the others."""
    from .formats import plan_from_json
    from .plan.front import front_series

    plan = plan_from_json(plan_json)
    series, source_ppl = front_series(plan, scores)
    if not series:
        raise LPError("--plot needs measured losses: none are known for this plan",
                      "pass --model, or scores measured with --measure-loss")
    plt = pyplot()
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
    _style_axes(ax, num_layers)
    fig.tight_layout()
    save_figure(fig, path, overwrite, FRONT_PLOT)


def _style_axes(ax, num_layers: int) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("effective depth (blocks)")
    ax.set_ylabel("calibration perplexity")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 22, not 2.2 x 10^1, on a narrow log range
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.invert_xaxis()  # deeper cuts to the right
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Quality/depth front ({num_layers} layers)")
    ax.legend(fontsize=8)


def _chosen_ppl(plan, series: dict) -> float:
    """The plan's own point: its measured calibration perplexity, else its strategy's estimate at its depth."""
    if "calibration" in plan.details:
        return plan.details["calibration"]["perplexity"]
    for p in series.get(plan.strategy, []):
        if p["depth"] == plan.effective_depth:
            return p["perplexity"]
    return math.nan


def plot_heal(report: dict, path, overwrite: bool | None = None) -> None:
    """Held-out perplexity of the model as each pair is healed in turn (heal report JSON)."""
    plt = pyplot()
    rows = report["pairs"]
    labels = ["unhealed"] + [f"({a},{b})" for a, b in (row["pair"] for row in rows)]
    values = [math.exp(rows[0]["heldout_loss_before"])] + [math.exp(row["heldout_loss_after"]) for row in rows]
    if report.get("distill"):
        labels.append("distill")
        values.append(math.exp(report["distill"]["heldout_loss_after"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6))
    colors = ["#999999"] + ["#4c72b0" if row["accepted"] else "#dd8452" for row in rows]
    ax.bar(range(len(values)), values, color=colors + ["#55a868"] * (len(values) - len(colors)))
    ax.set_xticks(range(len(values)), labels)
    ax.set_ylim(min(values) * 0.97, max(values) * 1.01)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{report['source']['name']}: healing pair by pair ({report['method']}; orange: rejected)")
    fig.tight_layout()
    save_figure(fig, path, overwrite, HEAL_PLOT)


def check_plot_path(path, kind: OwnedFile = PICTURE) -> str:
    """The format a picture at PATH is written in (png, pdf or svg: its name's end), or one LPError line for a
    name that is none of them or has nothing before its suffix (`.png`, `figs/.svg`)."""
    path = Path(path)
    check_file_name(path, kind)
    return path.suffix.lower().lstrip(".")


def save_figure(fig, path, overwrite: bool | None = None, kind: OwnedFile = PICTURE) -> None:
    """The one writer of pictures: FIG in the format its name ends in (FORMATS), marked as lpconvert's, atomically
    (a new file renamed into place: never through a link); a bad or unwritable path is one line. `overwrite`: the
    CLI's --overwrite (what is at `path` is checked again just before it is replaced); None (scripts/results/,
    redrawing docs/'s figures) replaces what is there."""
    plt = pyplot()
    try:
        fmt = check_plot_path(path, kind)
        with atomic_output_file(Path(path), kind if overwrite is not None else None, bool(overwrite)) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110, metadata={MARKER_KEYS[fmt]: PLOT_MARKER})
    finally:
        plt.close(fig)
