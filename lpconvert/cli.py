"""The lpconvert command line: parse options, call a stage, render the result.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so `--help`
answers at once. Every user error is an LPError: one line on stderr, exit code 2, no traceback
(unless --debug).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LPError

app = typer.Typer(
    name="lpconvert",
    help="Turn a pretrained Hugging Face causal LM into a faster layer-parallel checkpoint, without retraining.\n\n"
    "Pipeline: [bold]inspect[/] a model, [bold]score[/] its layers and pairs on calibration text, [bold]export[/] it "
    "with chosen pairs of consecutive layers run side by side.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}

ModelArg = Annotated[str, typer.Argument(
    help="A Hugging Face folder, a .gguf file or folder, the built-in [bold]smollm2-135m[/], or a hub id.",
    show_default=False)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running the source model's own code.",
                                        rich_help_panel="Source")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.", rich_help_panel="Output")]


def _version(value: bool) -> None:
    if value:
        print(f"lpconvert {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def stage(fn):
    """Run a command; map LPError to one line + exit 2 and Ctrl-C to exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LPError as exc:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {exc.one_line()}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was written at the output path")
            raise typer.Exit(130) from None

    return wrapper


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _load_source(model: str, trust_remote_code: bool):
    from .sources import resolve_model

    with err.status(f"Loading {model}..."):
        return resolve_model(model, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------
# inspect


@app.command()
@stage
def inspect(model: ModelArg, trust_remote_code: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Describe a model: architecture, whether lpconvert supports it, shapes, dtype, size."""
    from .describe import describe_model, render_description

    info = describe_model(_load_source(model, trust_remote_code))
    if as_json:
        _print_json(info)
    else:
        out.print(render_description(info))


# ----------------------------------------------------------------------------------------------
# score


@app.command()
@stage
def score(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores JSON.",
                                         rich_help_panel="Output")] = Path("scores.json"),
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, news, a .txt/.jsonl/.json file or folder, "
                                             "or a datasets name.", rich_help_panel="Calibration")] = "wiki",
    text_field: Annotated[str, typer.Option(help="Field holding the text in .jsonl/.json files and datasets.",
                                            rich_help_panel="Calibration")] = "text",
    tokens: Annotated[int, typer.Option(help="Calibration tokens.", rich_help_panel="Calibration")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.", rich_help_panel="Calibration")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for drawing windows.", rich_help_panel="Calibration")] = 0,
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: angular_distance, block_influence, pair_error, loss.",
        rich_help_panel="Metrics")] = "angular_distance,block_influence,pair_error",
    measure_loss: Annotated[bool, typer.Option(
        "--measure-loss", help="Also measure the calibration loss with each single pair in parallel (slow, decisive).",
        rich_help_panel="Metrics")] = False,
    loss_tokens: Annotated[int, typer.Option(help="Token budget of --measure-loss.",
                                             rich_help_panel="Metrics")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="Runtime")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel="Runtime")] = "float32",
    device_map: Annotated[str | None, typer.Option(
        help="'auto' spreads a model too large for one device (accelerate).", rich_help_panel="Runtime",
        show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw the scores into this PNG.", rich_help_panel="Output",
                                              show_default=False)] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure how much each layer and each candidate pair matters, on calibration text."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from .score import ScoreSettings, compute_scores, parse_metrics, plot_scores

    settings = ScoreSettings(calib=calib, text_field=text_field, tokens=tokens, seq_len=seq_len, seed=seed,
                             batch_size=batch_size, device=device, dtype=dtype, device_map=device_map,
                             metrics=parse_metrics(metrics), measure_loss=measure_loss, loss_tokens=loss_tokens)
    if batch_size <= 0 or seq_len < 2:
        raise LPError("--batch-size must be positive and --seq-len at least 2", "e.g. --batch-size 4 --seq-len 512")
    _check_writable_file(output)
    source = _load_source(model, trust_remote_code)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, disable=as_json, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        scores = compute_scores(source, settings, progress)
    _write_json_atomically(output, scores)
    if plot is not None:
        plot_scores(scores, plot)
    if as_json:
        _print_json({k: scores[k] for k in ("model", "calibration", "base", "safest_pairs", "agreement_with_loss",
                                            "timings")} | {"output": str(output)})
        return
    out.print(_scores_table(scores))
    out.print(f"scores written to [bold]{output}[/]" + (f", plot to [bold]{plot}[/]" if plot else ""))


def _scores_table(scores: dict) -> Table:
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
    for row in scores["pairs"]:
        cells = [f"({row['first']}, {row['first'] + 1})", f"{row['angular_distance']:.3f}"]
        if "pair_rel_l2" in row:
            cells += [f"{row['pair_rel_l2']:.3f}", f"{row['pair_cosine']:.3f}"]
        if measured:
            cells.append(f"{100 * row['loss_increase']:+.1f}%")
        table.add_row(*cells)
    safest = "; ".join(f"{m}: {', '.join(map(str, firsts))}" for m, firsts in scores["safest_pairs"].items())
    table.caption = f"safest pair starts by metric: {safest}"
    if scores.get("agreement_with_loss"):
        table.caption += "\nSpearman with measured loss (middle pairs): " + ", ".join(
            f"{m} {rho:+.2f}" for m, rho in scores["agreement_with_loss"].items())
    table.caption += f"\ntime: {scores['timings']['total_seconds']:.0f} s"
    return table


def _check_writable_file(path: Path) -> None:
    if path.exists() and path.is_dir():
        raise LPError(f"output {path} is a folder", "give a file path such as scores.json")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise LPError(f"the folder of {path} does not exist", f"create {parent} first")


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# export


@app.command()
@stage
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the checkpoint to.",
                                         show_default=False, rich_help_panel="Output")],
    plan: Annotated[Path | None, typer.Option("--plan", help="Plan JSON from `lpconvert plan`.",
                                              rich_help_panel="Pairs", show_default=False)] = None,
    pairs: Annotated[str | None, typer.Option(
        "--pairs", help="First layer of each pair, e.g. 12,14,16 (12 pairs layers 12 and 13); 'none' for a copy.",
        rich_help_panel="Pairs", show_default=False)] = None,
    allow_edge_layers: Annotated[bool, typer.Option(
        "--allow-edge-layers", help="Allow pairing the first or last layer (most damaging).",
        rich_help_panel="Pairs")] = False,
    dtype: Annotated[str, typer.Option(help="auto (keep the source dtype), float32, bfloat16 or float16.",
                                       rich_help_panel="Output")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest shard file, e.g. 5GB or 500MB.",
                                                rich_help_panel="Output")] = "5GB",
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the tokenizer files next to the weights.",
                                                 rich_help_panel="Output")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.",
                                            rich_help_panel="Output")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the block layout and shard plan; write nothing.",
                                          rich_help_panel="Output")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a layer-parallel checkpoint: each pair becomes one wide block, loadable with
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from .export import export as run_export
    from .export import plan_for_pairs
    from .formats import check_fingerprint, layer_strip, load_plan, parse_pairs, validate_pairs

    if (plan is None) == (pairs is None):
        raise LPError("give exactly one of --plan and --pairs", "e.g. --pairs 12,14 or --plan plan.json")
    loaded_plan = load_plan(plan) if plan is not None else None
    source = _load_source(model, trust_remote_code)
    if loaded_plan is not None:
        from .export import source_fingerprint

        check_fingerprint(loaded_plan.source, source_fingerprint(source.config, source.store), f"plan {plan}")
        validate_pairs(loaded_plan.pairs, loaded_plan.num_layers, allow_edge_layers)
    else:
        wanted = [] if pairs.strip().lower() in ("", "none") else parse_pairs(pairs)
        loaded_plan = plan_for_pairs(source, wanted, allow_edge_layers)
    if not loaded_plan.pairs:
        err.print("[yellow]warning:[/] the plan has no pairs; the export is an exact copy in lpconvert's format")

    report = _run_export_with_progress(run_export, source, loaded_plan, output, dtype=dtype,
                                       max_shard_size=max_shard_size, copy_tokenizer_files=copy_tokenizer,
                                       overwrite=overwrite, dry_run=dry_run, quiet=as_json)
    if as_json:
        _print_json(report.to_json())
        return
    strip = layer_strip(loaded_plan.pairs, loaded_plan.num_layers)
    table = Table(title="Dry run: nothing written" if dry_run else f"Exported to {output}", show_header=False)
    table.add_row("source", f"{source.name} ({source.config.model_type}, {loaded_plan.num_layers} layers)")
    table.add_row("pairs", ", ".join(f"({a}, {b})" for a, b in report.pairs) or "none")
    table.add_row("layer stack", strip)
    table.add_row("effective depth", f"{report.effective_depth} blocks (from {report.num_layers})")
    table.add_row("dtype", report.dtype)
    table.add_row("shards", "\n".join(f"{s['file']}  {_human_bytes(s['bytes'])}  ({s['tensors']} tensors)"
                                      for s in report.shards))
    table.add_row("total", _human_bytes(report.total_bytes))
    if not dry_run:
        table.add_row("time", f"{report.seconds:.1f} s")
        table.add_row("load with", f'AutoModelForCausalLM.from_pretrained("{output}", trust_remote_code=True)')
    out.print(table)


def _run_export_with_progress(run_export, source, plan, output, quiet: bool, **kwargs):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, disable=quiet or kwargs.get("dry_run", False), transient=True) as bar:
        task = bar.add_task("Writing weights", total=None)
        return run_export(source, plan, output, progress=lambda done, total: bar.update(task, completed=done,
                                                                                         total=total), **kwargs)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
