"""The lpconvert command line. Each command: parse options -> build the stage's settings -> call the
stage -> render. Defaults and checks live in settings.py, tables in render.py, pictures in the stages'
plot functions; nothing here computes a figure.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so `--help`
answers at once. Every user error is an LPError: one line on stderr, exit code 2 (1 for a failed
quality gate), no traceback unless --debug; Ctrl-C is exit 130. That mapping lives in `stage` only.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import LPError
from .settings import (
    BenchSettings,
    EvalSettings,
    ExportSettings,
    PlanSettings,
    ScoreSettings,
    build,
    defaults_of,
    option_label,
)

app = typer.Typer(
    name="lpconvert",
    help="Turn a pretrained Hugging Face causal LM into a faster layer-parallel checkpoint, without retraining.\n\n"
    "Pipeline: [bold]inspect[/] a model, [bold]score[/] its layers and pairs on calibration text, [bold]plan[/] "
    "which pairs to run side by side, [bold]export[/] the converted checkpoint, then [bold]eval[/] its quality "
    "and [bold]bench[/] its speed; [bold]convert[/] runs them all from a recipe.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state: dict = {"debug": False, "progress": None}

# Defaults shown by --help come from the stages' settings (settings.py): one source.
SCORE, PLAN, EXPORT, EVAL, BENCH = (defaults_of(cls) for cls in (ScoreSettings, PlanSettings, ExportSettings,
                                                                   EvalSettings, BenchSettings))

# ----------------------------------------------------------------------------------------------
# Options shared by several commands, declared once

ModelArg = Annotated[str, typer.Argument(
    help="A Hugging Face folder, a .gguf file or folder, the built-in [bold]smollm2-135m[/], or a hub id.",
    show_default=False)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running the source model's own code.",
                                        rich_help_panel="Source")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.", rich_help_panel="Output")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output folder that lpconvert wrote (never any other folder).",
    rich_help_panel="Output")]
AllowEdgeOpt = Annotated[bool, typer.Option(
    "--allow-edge-layers", help="Allow pairing the first or last layer (most damaging).", rich_help_panel="Pairs")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel="Runtime")]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="Runtime")]
TextFieldOpt = Annotated[str, typer.Option(help="Field holding the text in .jsonl/.json files and datasets.",
                                           rich_help_panel="Text")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per window.", rich_help_panel="Text")]
SeedOpt = Annotated[int, typer.Option(help="Seed for drawing windows.", rich_help_panel="Text")]


def _version(value: bool) -> None:
    if value:
        print(f"lpconvert {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    progress: Annotated[str | None, typer.Option(
        "--progress", help="How progress shows on stderr: bars (redrawn in place), lines (plain timed lines, "
        "for CI logs), off. Default: bars on a terminal, lines otherwise; env LPCONVERT_PROGRESS.",
        show_default=False)] = None,
) -> None:
    _state["debug"] = debug
    _state["progress"] = progress


def stage(fn):
    """Run a command; map LPError to one line + its exit code, and Ctrl-C to exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LPError as exc:
            if _state["debug"]:
                raise
            # escape: a message quoting "[i, i+1]" must not be read as Rich markup and vanish
            err.print(f"[bold red]error:[/] {escape(exc.one_line())}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was written at the output path")
            raise typer.Exit(130) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# Helpers of every command: progress, sources, output paths, JSON


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _reporter():
    from .progress import Reporter

    return Reporter(err, _state["progress"])


def _typed_paths(model: str | None) -> list[Path]:
    """The model path as typed, when it is one: protected before the source is even resolved."""
    return [Path(model).expanduser()] if model and Path(model).expanduser().exists() else []


def _check_output_folder(output: Path, overwrite: bool, model: str) -> None:
    """Refuse a taken or overlapping output path before spending seconds loading the source (the
    stage checks again, with every file of the resolved source, before it writes)."""
    from .outputs import check_output_folder

    check_output_folder(output, overwrite, _typed_paths(model))


def _check_output_file(path: Path | None, model: str | None) -> None:
    from .outputs import check_output_file

    if path is not None:
        check_output_file(path, _typed_paths(model))


def _load_source(model: str, trust_remote_code: bool, report=None):
    from .sources import resolve_model

    if report is None:
        with _reporter() as report:
            return _load_source(model, trust_remote_code, report)
    report.step(f"loading {model}")
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    report.end()
    return source


def _settings(cls, **values):
    """The stage's settings from the options as typed; a bad value is refused naming its option."""
    return build(cls, values, option_label)


# ----------------------------------------------------------------------------------------------
# inspect


@app.command()
@stage
def inspect(model: ModelArg, trust_remote_code: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Describe a model: architecture, whether lpconvert supports it, shapes, dtype, size."""
    from .describe import describe_model
    from .render import description_table

    info = describe_model(_load_source(model, trust_remote_code))
    if as_json:
        _print_json(info)
    else:
        out.print(description_table(info))


# ----------------------------------------------------------------------------------------------
# score


@app.command()
@stage
def score(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores JSON.",
                                         rich_help_panel="Output")] = Path("scores.json"),
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, news, a .txt/.jsonl/.json file or folder, "
                                             "or a datasets name.", rich_help_panel="Text")] = SCORE["calib"],
    text_field: TextFieldOpt = SCORE["text_field"],
    tokens: Annotated[int, typer.Option(help="Calibration tokens.", rich_help_panel="Text")] = SCORE["tokens"],
    seq_len: SeqLenOpt = SCORE["seq_len"],
    seed: SeedOpt = SCORE["seed"],
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: angular_distance, block_influence, pair_error, loss.",
        rich_help_panel="Metrics")] = ",".join(SCORE["metrics"]),
    measure_loss: Annotated[bool, typer.Option(
        "--measure-loss", help="Also measure the calibration loss with each single pair in parallel (slow, decisive).",
        rich_help_panel="Metrics")] = SCORE["measure_loss"],
    loss_tokens: Annotated[int, typer.Option(help="Token budget of --measure-loss.",
                                             rich_help_panel="Metrics")] = SCORE["loss_tokens"],
    batch_size: BatchOpt = SCORE["batch_size"],
    device: DeviceOpt = SCORE["device"],
    dtype: DtypeOpt = SCORE["dtype"],
    device_map: Annotated[str | None, typer.Option(
        help="'auto' spreads a model too large for one device (accelerate).", rich_help_panel="Runtime",
        show_default=False)] = SCORE["device_map"],
    plot: Annotated[Path | None, typer.Option(help="Also draw the scores into this PNG.", rich_help_panel="Output",
                                              show_default=False)] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure how much each layer and each candidate pair matters, on calibration text."""
    from .outputs import write_json_atomically
    from .plots import plot_scores
    from .render import scores_table
    from .score import compute_scores, parse_metrics

    settings = _settings(ScoreSettings, calib=calib, text_field=text_field, tokens=tokens, seq_len=seq_len,
                         seed=seed, batch_size=batch_size, device=device, dtype=dtype, device_map=device_map,
                         metrics=list(parse_metrics(metrics)), measure_loss=measure_loss, loss_tokens=loss_tokens)
    _check_output_file(output, model)
    _check_output_file(plot, model)  # before the scoring, not after it
    with _reporter() as report:
        scores = compute_scores(_load_source(model, trust_remote_code, report), settings, report.step)
    write_json_atomically(output, scores)
    if plot is not None:
        plot_scores(scores, plot)
    if as_json:
        _print_json({k: scores[k] for k in ("model", "calibration", "base", "safest_pairs", "agreement_with_loss",
                                            "timings")} | {"output": str(output)})
        return
    out.print(scores_table(scores))
    out.print(f"scores written to [bold]{output}[/]" + (f", plot to [bold]{plot}[/]" if plot else ""))


# ----------------------------------------------------------------------------------------------
# plan


@app.command()
@stage
def plan(
    scores: Annotated[Path, typer.Argument(help="Scores JSON from `lpconvert score`.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the plan JSON.",
                                                rich_help_panel="Output", show_default=False)] = None,
    pairs: Annotated[int | None, typer.Option("--pairs", help="Target: this many pairs.", rich_help_panel="Target",
                                              show_default=False)] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Target: this effective depth (layers - pairs).",
                                              rich_help_panel="Target", show_default=False)] = None,
    speedup: Annotated[float | None, typer.Option(
        "--speedup", help="Target: this decode speedup, ESTIMATED by a cost model (time ∝ layers - 0.55·pairs).",
        rich_help_panel="Target", show_default=False)] = None,
    max_loss_increase: Annotated[str | None, typer.Option(
        "--max-loss-increase", help="Target: the most pairs whose measured calibration loss stays within X% of the "
        "source's, e.g. 5%.", rich_help_panel="Target", show_default=False)] = None,
    strategy: Annotated[str | None, typer.Option(
        "--strategy", help="contiguous (the paper's rule), greedy (best pairs by --metric) or search (measure the "
        "model with all pairs at every step). Default: search with --model, else greedy.",
        rich_help_panel="Strategy", show_default=False)] = PLAN["strategy"],
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Per-pair metric of the scores used to rank pairs: loss_increase, pair_rel_l2, pair_cosine "
        "or angular_distance. Default: loss_increase when the scores have it, else pair_cosine (the cheap metric "
        "that agreed best with measured loss on SmolLM2).",
        rich_help_panel="Strategy", show_default=False)] = PLAN["metric"],
    allow_edge_layers: AllowEdgeOpt = PLAN["allow_edge_layers"],
    model: Annotated[str | None, typer.Option(
        "--model", help="The scored model; lets the planner measure pair sets (needed by search).",
        rich_help_panel="Measuring", show_default=False)] = None,
    objective: Annotated[str, typer.Option(
        help="What measuring minimises: kl (divergence from the source's next-token distribution, resists "
        "overfitting) or loss (calibration NLL, the paper's perplexity sweep).",
        rich_help_panel="Measuring")] = PLAN["objective"],
    candidates: Annotated[int, typer.Option(help="Search: pool of pairs pre-ranked by --metric.",
                                            rich_help_panel="Measuring")] = PLAN["candidates"],
    beam: Annotated[int, typer.Option(help="Search: sets kept at each step (2 keeps a runner-up path: a pair "
                                           "that is best alone can block two better ones).",
                                      rich_help_panel="Measuring")] = PLAN["beam"],
    verify: Annotated[int, typer.Option(
        help="Search: best sets of each step re-measured on the calibration text's held-out split before one is "
        "kept (0: off).", rich_help_panel="Measuring")] = PLAN["verify"],
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, a .txt/.jsonl/.json file or folder, or a "
                                            "datasets name.", rich_help_panel="Text")] = PLAN["calib"],
    tokens: Annotated[int, typer.Option(
        help="Calibration tokens every candidate set is measured on (the search's screening).",
        rich_help_panel="Text")] = PLAN["tokens"],
    heldout_tokens: Annotated[int, typer.Option(
        help="Held-out tokens (same text, windows calibration never uses) the --verify best sets of each search "
        "step are re-measured on; they then count with the calibration tokens.",
        rich_help_panel="Text")] = PLAN["heldout_tokens"],
    seq_len: SeqLenOpt = PLAN["seq_len"],
    seed: SeedOpt = PLAN["seed"],
    batch_size: BatchOpt = PLAN["batch_size"],
    device: DeviceOpt = PLAN["device"],
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16.",
                                       rich_help_panel="Runtime")] = PLAN["dtype"],
    plot: Annotated[Path | None, typer.Option(help="Also draw calibration perplexity against effective depth "
                                                   "(the quality/depth front) into this PNG.",
                                              rich_help_panel="Output", show_default=False)] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose which consecutive layers to pair, for a target depth, speedup or loss budget."""
    from .formats import layer_strip, load_scores, source_fingerprint
    from .outputs import write_json_atomically
    from .plan import ALPHA, parse_target, plan_stage
    from .plots import plot_front
    from .render import plan_table

    target = parse_target(pairs, depth, speedup, max_loss_increase)
    settings = _settings(PlanSettings, strategy=strategy, metric=metric, objective=objective, candidates=candidates,
                         beam=beam, verify=verify, allow_edge_layers=allow_edge_layers, calib=calib, tokens=tokens,
                         heldout_tokens=heldout_tokens, seq_len=seq_len, seed=seed, batch_size=batch_size,
                         device=device, dtype=dtype, use_model=model is not None)
    if output is None and not as_json:
        raise LPError("give -o plan.json (or --json to print the plan)", "e.g. lpconvert plan scores.json -o plan.json")
    for path in (output, plot):
        _check_output_file(path, model)
    with _reporter() as reporter:
        source = _load_source(model, trust_remote_code, reporter) if model is not None else None
        scores_data = load_scores(scores, source_fingerprint(source.config, source.store) if source else None)
        result = plan_stage(scores_data, target, settings, source, scores_path=f"scores {scores}",
                            progress=lambda message: reporter.step("planning", detail=message))
    data = result.to_json()
    if output is not None:
        write_json_atomically(output, data)
    if plot is not None:
        plot_front(data, scores_data, plot)
    if as_json:
        _print_json(data)
        return
    name = model or scores_data.get("model", {}).get("name", "?")
    out.print(plan_table(data, name, layer_strip(result.pairs, result.num_layers), ALPHA))
    written = [f"plan written to [bold]{output}[/]"] if output is not None else []
    if plot is not None:
        written.append(f"plot to [bold]{plot}[/]")
    if written:
        out.print(", ".join(written))


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
    allow_edge_layers: AllowEdgeOpt = False,
    dtype: Annotated[str, typer.Option(help="auto (keep the source dtype), float32, bfloat16 or float16.",
                                       rich_help_panel="Output")] = EXPORT["dtype"],
    max_shard_size: Annotated[str, typer.Option(help="Largest shard file, e.g. 5GB or 500MB.",
                                                rich_help_panel="Output")] = EXPORT["max_shard_size"],
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the tokenizer files next to the weights.",
                                                 rich_help_panel="Output")] = EXPORT["copy_tokenizer"],
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the block layout and shard plan; write nothing.",
                                          rich_help_panel="Output")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a layer-parallel checkpoint: each pair becomes one wide block, loadable with
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from .export import export as run_export
    from .formats import layer_strip, load_plan, parse_pairs, plan_for_source, source_fingerprint
    from .render import export_table

    if (plan is None) == (pairs is None):
        raise LPError("give exactly one of --plan and --pairs", "e.g. --pairs 12,14 or --plan plan.json")
    if pairs is not None and not pairs.strip():
        raise LPError("--pairs is empty", "give pair starts such as --pairs 12,14, or --pairs none for an exact copy")
    loaded_plan = load_plan(plan) if plan is not None else None
    wanted = None if pairs is None or pairs.strip().lower() == "none" else parse_pairs(pairs)
    settings = _settings(ExportSettings, dtype=dtype, max_shard_size=max_shard_size, copy_tokenizer=copy_tokenizer)
    _check_output_folder(output, overwrite, model)
    with _reporter() as progress:
        source = _load_source(model, trust_remote_code, progress)
        chosen = plan_for_source(source_fingerprint(source.config, source.store), plan=loaded_plan,
                                 plan_name=f"plan {plan}", pairs=wanted, allow_edge_layers=allow_edge_layers)
        if not chosen.pairs:
            progress.end()
            err.print("[yellow]warning:[/] the plan has no pairs; the export is an exact copy in lpconvert's format")
        report = run_export(source, chosen, output, dtype=settings.dtype, max_shard_size=settings.max_shard_size,
                            copy_tokenizer_files=settings.copy_tokenizer, overwrite=overwrite, dry_run=dry_run,
                            progress=progress.counter("writing weights", "bytes"))
    if as_json:
        _print_json(report.to_json())
        return
    source_line = f"{source.name} ({source.config.model_type}, {chosen.num_layers} layers)"
    out.print(export_table(report.to_json(), source_line, layer_strip(chosen.pairs, chosen.num_layers)))


# ----------------------------------------------------------------------------------------------
# eval


@app.command(name="eval")
@stage
def eval_command(
    source_model: Annotated[str, typer.Argument(metavar="SOURCE", help="The original model.", show_default=False)],
    converted_model: Annotated[str, typer.Argument(metavar="CONVERTED", help="The folder written by export.",
                                                   show_default=False)],
    text: Annotated[str, typer.Option(help="Evaluation text: wiki, news, a file or folder, or a datasets name.",
                                      rich_help_panel="Text")] = EVAL["text"],
    split: Annotated[str, typer.Option(help="heldout: the windows calibration never uses; all: every window "
                                            "(for a text never used to calibrate).", rich_help_panel="Text")
                     ] = EVAL["split"],
    text_field: TextFieldOpt = EVAL["text_field"],
    tokens: Annotated[int, typer.Option(help="Evaluation tokens.", rich_help_panel="Text")] = EVAL["tokens"],
    seq_len: SeqLenOpt = EVAL["seq_len"],
    prompt: Annotated[str, typer.Option(help="Prompt of the side-by-side generation.",
                                        rich_help_panel="Text")] = EVAL["prompt"],
    max_ppl_increase: Annotated[str | None, typer.Option(
        help="Gate: fail (exit 1) when perplexity rises more than this, e.g. 10%.", rich_help_panel="Gate",
        show_default=False)] = None,
    min_agreement: Annotated[float | None, typer.Option(
        help="Gate: fail (exit 1) when greedy next-token agreement is below this, e.g. 0.85.",
        rich_help_panel="Gate", show_default=False)] = None,
    batch_size: BatchOpt = EVAL["batch_size"],
    device: DeviceOpt = EVAL["device"],
    dtype: DtypeOpt = EVAL["dtype"],
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare a converted model with its source on held-out text: perplexity, agreement, KL, generations.
    With --max-ppl-increase / --min-agreement it is a gate: exit 1 when a bound is broken."""
    from .evaluate import evaluate
    from .render import eval_table

    settings = _settings(EvalSettings, text=text, split=split, text_field=text_field, tokens=tokens,
                         seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype, prompt=prompt,
                         max_ppl_increase=max_ppl_increase, min_agreement=min_agreement)
    with _reporter() as progress:
        source = _load_source(source_model, trust_remote_code, progress)
        converted = _load_source(converted_model, trust_remote_code, progress)
        report = evaluate(source, converted, settings, progress.counter("evaluating both models", "batches"))
    if as_json:
        _print_json(report)
    else:
        out.print(eval_table(report))
    if not report["passed"]:
        err.print(f"[bold red]gate failed:[/] {'; '.join(report['failures'])}", highlight=False)
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------
# bench


def _comma_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LPError(f"{option} takes comma-separated integers, got '{text}'", f"e.g. {option} 1,8") from None


@app.command()
@stage
def bench(
    model: Annotated[str | None, typer.Argument(help="The model to time (e.g. a converted folder).",
                                                show_default=False)] = None,
    baseline: Annotated[str | None, typer.Option(help="Also time this model (e.g. the source) in the same process "
                                                      "and print the speedup.", show_default=False)] = None,
    random_weights: Annotated[str | None, typer.Option(
        help="Instead of MODEL: build a source with random weights at this shape on the device "
             "(llama2-7b, llama3-8b, llama3.2-3b, qwen2.5-0.5b-shape, tiny) and convert it in memory.",
        rich_help_panel="Random weights", show_default=False)] = None,
    pair_counts: Annotated[str, typer.Option(help="With --random-weights: pair counts to convert with, placed in "
                                                  "the middle of the stack.", rich_help_panel="Random weights")] = "0,7",
    batch_size: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8.", rich_help_panel="Workload")
                          ] = ",".join(map(str, BENCH["batch_sizes"])),
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens.", rich_help_panel="Workload")] = BENCH["prompt_len"],
    new_tokens: Annotated[int, typer.Option(help="Generated tokens.", rich_help_panel="Workload")] = BENCH["new_tokens"],
    warmup: Annotated[int, typer.Option(help="Warm-up runs.", rich_help_panel="Workload")] = BENCH["warmup"],
    repeats: Annotated[int, typer.Option(help="Timed runs (median reported).", rich_help_panel="Workload")
                       ] = BENCH["repeats"],
    compile_: Annotated[bool, typer.Option("--compile", help="Static cache, compiled decode step.",
                                           rich_help_panel="Runtime")] = BENCH["compile"],
    device: DeviceOpt = BENCH["device"],
    dtype: DtypeOpt = BENCH["dtype"],
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prefill and decode tokens/s with transformers generate, eager or compiled; with a baseline, the speedup."""
    from .bench import bench_models, bench_random_weights
    from .render import bench_table

    if (model is None) == (random_weights is None):
        raise LPError("give MODEL or --random-weights SHAPE (one of them)", "e.g. lpconvert bench out/ --baseline src/")
    counts = _comma_ints(pair_counts, "--pair-counts")
    labels = {"batch_sizes": "--batch-size", "compile": "--compile"}
    settings = build(BenchSettings, dict(batch_sizes=_comma_ints(batch_size, "--batch-size"), prompt_len=prompt_len,
                                         new_tokens=new_tokens, warmup=warmup, repeats=repeats, compile=compile_,
                                         device=device, dtype=dtype), lambda key: labels.get(key, option_label(key)))
    with _reporter() as progress:
        def note(text: str) -> None:
            progress.step("benchmarking", detail=text)

        if random_weights is not None:
            report = bench_random_weights(random_weights, counts, settings, note)
        else:
            target = _load_source(model, trust_remote_code, progress)
            base = _load_source(baseline, trust_remote_code, progress) if baseline is not None else None
            report = bench_models(target, base, settings, note)
    if as_json:
        _print_json(report)
    else:
        out.print(bench_table(report))


# ----------------------------------------------------------------------------------------------
# convert


@app.command()
@stage
def convert(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the converted model and its reports.",
                                         show_default=False)],
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with the settings of every stage "
                                                     "(see configs/).", show_default=False)] = None,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep OUT even when the gate fails.")] = False,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """score -> plan -> export -> eval in one step, for CI. Exit 0: converted and passed the gate;
    1: the gate failed (nothing written unless --keep-failed); 2: bad input."""
    from .convert import convert as run_convert
    from .convert import load_recipe
    from .render import eval_table

    settings = load_recipe(recipe)
    _check_output_folder(output, overwrite, model)
    with _reporter() as progress:
        source = _load_source(model, trust_remote_code, progress)
        # A failed gate raises GateFailed, an LPError with exit code 1, and leaves nothing at OUT.
        summary = run_convert(source, output, settings, overwrite=overwrite, keep_failed=keep_failed,
                              progress=progress.step)
    if as_json:
        _print_json(summary)
    else:
        out.print(eval_table(summary["eval"]))
        out.print(f"converted model in [bold]{output}[/]: {len(summary['pairs'])} pairs, "
                  f"{summary['effective_depth']} blocks (recipe, scores, plan and eval report alongside)")
    if not summary["passed"]:
        err.print(f"[bold red]gate failed[/] (kept because of --keep-failed): {'; '.join(summary['eval']['failures'])}")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
