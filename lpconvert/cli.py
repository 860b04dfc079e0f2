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
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import LPError
from .plan import (
    ALPHA,
    DEFAULT_BEAM,
    DEFAULT_CANDIDATES,
    DEFAULT_HELDOUT_TOKENS,
    DEFAULT_TOKENS,
    DEFAULT_VERIFY,
)

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
_state: dict = {"debug": False, "progress": None}

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
    progress: Annotated[str | None, typer.Option(
        "--progress", help="How progress shows on stderr: bars (redrawn in place), lines (plain timed lines, "
        "for CI logs), off. Default: bars on a terminal, lines otherwise; env LPCONVERT_PROGRESS.",
        show_default=False)] = None,
) -> None:
    _state["debug"] = debug
    _state["progress"] = progress


def stage(fn):
    """Run a command; map LPError to one line + exit 2 and Ctrl-C to exit 130."""

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


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _reporter():
    from .progress import Reporter

    return Reporter(err, _state["progress"])


def _typed_paths(model: str | None) -> list[Path]:
    """The model path as typed, when it is one: protected before the source is even resolved."""
    return [Path(model).expanduser()] if model and Path(model).expanduser().exists() else []


def _check_output_early(output: Path, overwrite: bool, model: str) -> None:
    """Refuse a taken or overlapping output path before spending seconds loading the source (the
    stage checks again, with every file of the resolved source, before it writes)."""
    from .outputs import check_output_folder

    check_output_folder(output, overwrite, _typed_paths(model))


def _check_output_file(path: Path | None, *models: str | None) -> None:
    from .outputs import check_output_file

    if path is not None:
        check_output_file(path, [p for model in models for p in _typed_paths(model)])


def _load_source(model: str, trust_remote_code: bool, report=None):
    from .sources import resolve_model

    if report is None:
        with _reporter() as report:
            return _load_source(model, trust_remote_code, report)
    report.step(f"loading {model}")
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    report.end()
    return source


def _check_positions(name: str, config, tokens: int, what: str) -> None:
    """Refuse a length beyond the positions the model was trained for (it would run, slowly, and
    measure a model outside what it knows)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise LPError(f"{what} is {tokens} tokens, beyond the {limit} positions of {name}",
                      f"use at most {limit} tokens")


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
    from .outputs import write_json_atomically
    from .score import ScoreSettings, compute_scores, parse_metrics, plot_scores

    settings = ScoreSettings(calib=calib, text_field=text_field, tokens=tokens, seq_len=seq_len, seed=seed,
                             batch_size=batch_size, device=device, dtype=dtype, device_map=device_map,
                             metrics=parse_metrics(metrics), measure_loss=measure_loss, loss_tokens=loss_tokens)
    if batch_size <= 0 or seq_len < 2:
        raise LPError("--batch-size must be positive and --seq-len at least 2", "e.g. --batch-size 4 --seq-len 512")
    _check_output_file(output, model)
    _check_output_file(plot, model)  # before the scoring, not after it
    with _reporter() as report:
        source = _load_source(model, trust_remote_code, report)
        _check_positions(source.name, source.config, seq_len, "--seq-len")
        scores = compute_scores(source, settings, report.step)
    write_json_atomically(output, scores)
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


# ----------------------------------------------------------------------------------------------
# eval


@app.command(name="eval")
@stage
def eval_command(
    source_model: Annotated[str, typer.Argument(metavar="SOURCE", help="The original model.", show_default=False)],
    converted_model: Annotated[str, typer.Argument(metavar="CONVERTED", help="The folder written by export.",
                                                   show_default=False)],
    text: Annotated[str, typer.Option(help="Evaluation text: wiki, news, a file or folder, or a datasets name.",
                                      rich_help_panel="Text")] = "wiki",
    split: Annotated[str, typer.Option(help="heldout: the windows calibration never uses; all: every window "
                                            "(for a text never used to calibrate).", rich_help_panel="Text")] = "heldout",
    text_field: Annotated[str, typer.Option(help="Field holding the text in .jsonl/.json files and datasets.",
                                            rich_help_panel="Text")] = "text",
    tokens: Annotated[int, typer.Option(help="Evaluation tokens.", rich_help_panel="Text")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.", rich_help_panel="Text")] = 512,
    prompt: Annotated[str, typer.Option(help="Prompt of the side-by-side generation.",
                                        rich_help_panel="Text")] = "The capital of France is",
    max_ppl_increase: Annotated[str | None, typer.Option(
        help="Gate: fail (exit 1) when perplexity rises more than this, e.g. 10%.", rich_help_panel="Gate",
        show_default=False)] = None,
    min_agreement: Annotated[float | None, typer.Option(
        help="Gate: fail (exit 1) when greedy next-token agreement is below this, e.g. 0.85.",
        rich_help_panel="Gate", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="Runtime")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel="Runtime")] = "float32",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare a converted model with its source on held-out text: perplexity, agreement, KL, generations.
    With --max-ppl-increase / --min-agreement it is a gate: exit 1 when a bound is broken."""
    from .evaluate import EvalSettings, evaluate
    from .formats import check_converted_from, parse_percent
    from .settings import check_setting

    if split not in ("heldout", "all"):
        raise LPError(f"--split '{split}' does not exist", "use heldout or all")
    check_setting("eval", "min_agreement", min_agreement, "--min-agreement")  # the recipe's rule, named as typed
    settings = EvalSettings(text=text, split=split, text_field=text_field, tokens=tokens, seq_len=seq_len,
                            batch_size=batch_size, device=device, dtype=dtype, prompt=prompt,
                            max_ppl_increase=parse_percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase else None,
                            min_agreement=min_agreement)
    with _reporter() as progress:
        source = _load_source(source_model, trust_remote_code, progress)
        converted = _load_source(converted_model, trust_remote_code, progress)
        check_converted_from(converted, source)
        _check_positions(source.name, source.config, seq_len, "--seq-len")
        report = evaluate(source, converted, settings, progress.counter("evaluating both models", "batches"))
    if as_json:
        _print_json(report)
    else:
        out.print(_eval_table(report))
    if not report["passed"]:
        err.print(f"[bold red]gate failed:[/] {'; '.join(report['failures'])}", highlight=False)
        raise typer.Exit(1)


def _eval_table(report: dict) -> Table:
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
    table.add_row("KL(source || converted), nats/token", "", f"{report['kl_divergence']:.4f}")
    generation = report["generation"]
    table.add_row(f"generation: {generation['prompt']!r}", " ".join(generation["source"].split()),
                  " ".join(generation["converted"].split()))
    gate = [f"{k}={v}" for k, v in report["gate"].items() if v is not None]
    table.caption = ("gate: " + ", ".join(gate) + (" passed" if report["passed"] else " FAILED")) if gate else None
    return table


# ----------------------------------------------------------------------------------------------
# bench


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
    batch_size: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8.", rich_help_panel="Workload")] = "1",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens.", rich_help_panel="Workload")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Generated tokens.", rich_help_panel="Workload")] = 128,
    warmup: Annotated[int, typer.Option(help="Warm-up runs.", rich_help_panel="Workload")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs (median reported).", rich_help_panel="Workload")] = 3,
    compile_: Annotated[bool, typer.Option("--compile", help="Static cache, compiled decode step.",
                                           rich_help_panel="Runtime")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel="Runtime")] = "bfloat16",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prefill and decode tokens/s with transformers generate, eager or compiled; with a baseline, the speedup."""
    from .bench import BenchSettings, measure, middle_pairs, random_source_model, settings_json, speedups
    from .runtime import dtype_from_name, resolve_device

    if (model is None) == (random_weights is None):
        raise LPError("give MODEL or --random-weights SHAPE (one of them)", "e.g. lpconvert bench out/ --baseline src/")
    try:
        batches = tuple(int(b) for b in batch_size.split(","))
        counts = [int(c) for c in pair_counts.split(",")]
    except ValueError:
        raise LPError("--batch-size and --pair-counts take comma-separated integers", "e.g. --batch-size 1,8") from None
    if min(batches) < 1 or min(prompt_len, new_tokens, repeats) < 1 or warmup < 0:
        raise LPError("batch sizes, lengths and repeats must be positive", "e.g. --batch-size 1 --repeats 3")
    settings = BenchSettings(batch_sizes=batches, prompt_len=prompt_len, new_tokens=new_tokens, warmup=warmup,
                             repeats=repeats, compile=compile_, device=device, dtype=dtype)
    run_device, run_dtype = resolve_device(device), dtype_from_name(dtype)
    rows: list[dict] = []
    with _reporter() as progress:
        def note(text: str) -> None:
            progress.step("benchmarking", detail=text)

        if random_weights is not None:
            from .export import convert_in_memory

            source = random_source_model(random_weights, run_dtype, run_device)
            _check_positions(random_weights, source.config, prompt_len + new_tokens,
                             "--prompt-len + --new-tokens")
            plans = [(count, middle_pairs(source.config.num_hidden_layers, count)) for count in counts]
            rows += measure(source, settings, run_device, "source", note)
            for count, pairs in plans:
                converted = convert_in_memory(source, pairs, name=f"{random_weights} random")
                rows += measure(converted, settings, run_device, f"lp-{count}", note)
                del converted
            reference = "source"
        else:
            target_source = _load_source(model, trust_remote_code, progress)
            base_source = _load_source(baseline, trust_remote_code, progress) if baseline is not None else None
            if base_source is not None:
                from .formats import check_converted_from

                check_converted_from(target_source, base_source, role="MODEL")
            for checked in (target_source, base_source):
                if checked is not None:
                    _check_positions(checked.name, checked.config, prompt_len + new_tokens, "--prompt-len + --new-tokens")
            target = target_source.load_model(dtype=run_dtype, device=run_device)
            if base_source is not None:
                base_model = base_source.load_model(dtype=run_dtype, device=run_device)
                rows += measure(base_model, settings, run_device, "baseline", note)
                del base_model
            rows += measure(target, settings, run_device, "model", note)
            reference = "baseline"
    report = {"rows": rows, "speedups": speedups(rows, reference), "settings": settings_json(settings),
              "device": run_device, "random_weights": random_weights, "model": model, "baseline": baseline}
    if run_device.startswith("cuda"):
        report["gpu"] = __import__("torch").cuda.get_device_name()
    if as_json:
        _print_json(report)
        return
    table = Table(title=f"tokens/s on {report.get('gpu', run_device)} ({dtype}, prompt {prompt_len}, "
                        f"{new_tokens} new tokens, median of {repeats})")
    for column in ("model", "batch", "mode", "decode tok/s", "prefill tok/s", "decode speedup"):
        table.add_column(column, justify="left" if column == "model" else "right")
    gains = {(g["model"], g["batch"], g["mode"]): g["decode"] for g in report["speedups"]}
    for row in rows:
        gain = gains.get((row["model"], row["batch"], row["mode"]))
        table.add_row(row["model"], str(row["batch"]), row["mode"], f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['prefill_tokens_per_s']:.0f}", f"{gain:.2f}x" if gain else "")
    out.print(table)


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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """score -> plan -> export -> eval in one step, for CI. Exit 0: converted and passed the gate;
    1: the gate failed (nothing written unless --keep-failed); 2: bad input."""
    from .convert import convert as run_convert
    from .convert import load_recipe

    settings = load_recipe(recipe)
    _check_output_early(output, overwrite, model)
    with _reporter() as progress:
        source = _load_source(model, trust_remote_code, progress)
        # A failed gate raises GateFailed, an LPError with exit code 1, and leaves nothing at OUT.
        summary = run_convert(source, output, settings, overwrite=overwrite, keep_failed=keep_failed,
                              progress=progress.step)
    if as_json:
        _print_json(summary)
    else:
        out.print(_eval_table(summary["eval"]))
        out.print(f"converted model in [bold]{output}[/]: {len(summary['pairs'])} pairs, "
                  f"{summary['effective_depth']} blocks (recipe, scores, plan and eval report alongside)")
    if not summary["passed"]:
        err.print(f"[bold red]gate failed[/] (kept because of --keep-failed): {'; '.join(summary['eval']['failures'])}")
        raise typer.Exit(1)


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
    from .formats import (
        check_fingerprint,
        layer_strip,
        load_plan,
        parse_pairs,
        source_fingerprint,
        validate_pairs,
    )
    from .progress import human_bytes
    from .runtime import dtype_from_name
    from .settings import parse_size

    if (plan is None) == (pairs is None):
        raise LPError("give exactly one of --plan and --pairs", "e.g. --pairs 12,14 or --plan plan.json")
    if pairs is not None and not pairs.strip():
        raise LPError("--pairs is empty", "give pair starts such as --pairs 12,14, or --pairs none for an exact copy")
    loaded_plan = load_plan(plan) if plan is not None else None
    wanted = None if pairs is None or pairs.strip().lower() == "none" else parse_pairs(pairs)
    parse_size(max_shard_size)  # a bad size or dtype is refused before the source loads
    if dtype != "auto":
        dtype_from_name(dtype, extra=("auto",))
    _check_output_early(output, overwrite, model)
    with _reporter() as progress:
        source = _load_source(model, trust_remote_code, progress)
        if loaded_plan is not None:
            check_fingerprint(loaded_plan.source, source_fingerprint(source.config, source.store), f"plan {plan}")
            validate_pairs(loaded_plan.pairs, loaded_plan.num_layers, allow_edge_layers)
        else:
            loaded_plan = plan_for_pairs(source, wanted or [], allow_edge_layers)
        if not loaded_plan.pairs:
            progress.end()
            err.print("[yellow]warning:[/] the plan has no pairs; the export is an exact copy in lpconvert's format")
        report = run_export(source, loaded_plan, output, dtype=dtype, max_shard_size=max_shard_size,
                            copy_tokenizer_files=copy_tokenizer, overwrite=overwrite, dry_run=dry_run,
                            progress=progress.counter("writing weights", "bytes"))
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
    table.add_row("shards", "\n".join(f"{s['file']}  {human_bytes(s['bytes'])}  ({s['tensors']} tensors)"
                                      for s in report.shards))
    table.add_row("total", human_bytes(report.total_bytes))
    if not dry_run:
        table.add_row("time", f"{report.seconds:.1f} s")
        table.add_row("load with", f'AutoModelForCausalLM.from_pretrained("{output}", trust_remote_code=True)')
    out.print(table)


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
        rich_help_panel="Strategy", show_default=False)] = None,
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Per-pair metric of the scores used to rank pairs: loss_increase, pair_rel_l2, pair_cosine "
        "or angular_distance. Default: loss_increase when the scores have it, else pair_cosine (the cheap metric "
        "that agreed best with measured loss on SmolLM2).",
        rich_help_panel="Strategy", show_default=False)] = None,
    allow_edge_layers: Annotated[bool, typer.Option(
        "--allow-edge-layers", help="Allow pairing the first or last layer (most damaging).",
        rich_help_panel="Strategy")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", help="The scored model; lets the planner measure pair sets (needed by search).",
        rich_help_panel="Measuring", show_default=False)] = None,
    objective: Annotated[str, typer.Option(
        help="What measuring minimises: kl (divergence from the source's next-token distribution, resists "
        "overfitting) or loss (calibration NLL, the paper's perplexity sweep).", rich_help_panel="Measuring")] = "kl",
    candidates: Annotated[int, typer.Option(help="Search: pool of pairs pre-ranked by --metric.",
                                            rich_help_panel="Measuring")] = DEFAULT_CANDIDATES,
    beam: Annotated[int, typer.Option(help="Search: sets kept at each step (2 keeps a runner-up path: a pair "
                                           "that is best alone can block two better ones).",
                                      rich_help_panel="Measuring")] = DEFAULT_BEAM,
    verify: Annotated[int, typer.Option(
        help="Search: best sets of each step re-measured on the calibration text's held-out split before one is "
        "kept (0: off).", rich_help_panel="Measuring")] = DEFAULT_VERIFY,
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, a .txt/.jsonl/.json file or folder, or a "
                                            "datasets name.", rich_help_panel="Calibration")] = "wiki",
    tokens: Annotated[int, typer.Option(
        help="Calibration tokens every candidate set is measured on (the search's screening).",
        rich_help_panel="Calibration")] = DEFAULT_TOKENS,
    heldout_tokens: Annotated[int, typer.Option(
        help="Held-out tokens (same text, windows calibration never uses) the --verify best sets of each search "
        "step are re-measured on; they then count with the calibration tokens.",
        rich_help_panel="Calibration")] = DEFAULT_HELDOUT_TOKENS,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.", rich_help_panel="Calibration")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for drawing windows.", rich_help_panel="Calibration")] = 0,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="Runtime")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16.",
                                       rich_help_panel="Runtime")] = "auto",
    plot: Annotated[Path | None, typer.Option(help="Also draw calibration perplexity against effective depth "
                                                   "(the quality/depth front) into this PNG.",
                                              rich_help_panel="Output", show_default=False)] = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose which consecutive layers to pair, for a target depth, speedup or loss budget."""
    from .formats import PAIR_METRICS, layer_strip, load_scores
    from .plan import OBJECTIVES, STRATEGIES, build_calibrator, make_plan, pairs_for_target, parse_target

    target = parse_target(pairs, depth, speedup, max_loss_increase)
    if output is None and not as_json:
        raise LPError("give -o plan.json (or --json to print the plan)", "e.g. lpconvert plan scores.json -o plan.json")
    if strategy is not None and strategy not in STRATEGIES:
        raise LPError(f"--strategy {strategy} does not exist", f"use one of {', '.join(STRATEGIES)}")
    if metric is not None and metric not in PAIR_METRICS:
        raise LPError(f"--metric {metric} is not a per-pair metric", f"use one of {', '.join(PAIR_METRICS)}")
    if objective not in OBJECTIVES:
        raise LPError(f"--objective {objective} does not exist", f"use one of {', '.join(OBJECTIVES)}")
    if strategy == "search" and model is None:
        raise LPError("--strategy search measures the model at every step and needs --model",
                      "pass --model MODEL, or use --strategy greedy")
    for name, value in (("--candidates", candidates), ("--beam", beam), ("--batch-size", batch_size)):
        if value < 1:
            raise LPError(f"{name} must be at least 1, got {value}", f"e.g. {name} 4")
    if verify < 0 or heldout_tokens < 0:
        raise LPError("--verify and --heldout-tokens cannot be negative", "use 0 to switch the check off")
    if 0 < heldout_tokens < seq_len and verify:
        raise LPError(f"--heldout-tokens {heldout_tokens} is less than one window of --seq-len {seq_len}",
                      f"use --heldout-tokens {seq_len} or more, or 0 to switch the held-out check off")
    for path in (output, plot):
        _check_output_file(path, model)

    import time

    from .formats import source_fingerprint
    from .outputs import write_json_atomically

    started = time.perf_counter()
    with _reporter() as reporter:
        source = _load_source(model, trust_remote_code, reporter) if model is not None else None
        expected = source_fingerprint(source.config, source.store) if source is not None else None
        scores_data = load_scores(scores, expected)
        num_layers = int(scores_data["source"]["num_layers"])
        pairs_for_target(target, num_layers, allow_edge_layers)  # refuse an impossible target before measuring

        def progress(message: str) -> None:
            reporter.step("planning", detail=message)

        calibrator = None
        if source is not None:
            calibrator = build_calibrator(source, calib=calib, tokens=tokens, seq_len=seq_len, seed=seed,
                                          heldout_tokens=heldout_tokens if verify else 0, objective=objective,
                                          batch_size=batch_size, device=device, dtype=dtype, progress=progress)
        result = make_plan(scores_data, target=target, strategy=strategy, metric=metric, calibrator=calibrator,
                           allow_edge_layers=allow_edge_layers, candidates=candidates, beam=beam, verify=verify,
                           source=expected, scores_path=f"scores {scores}", progress=progress, started=started)
    data = result.to_json()
    if output is not None:
        write_json_atomically(output, data)
    if plot is not None:
        from .plan import plot_front

        plot_front(result, scores_data, plot)
    if as_json:
        _print_json(data)
        return
    out.print(_plan_table(result, model or scores_data.get("model", {}).get("name", "?"), layer_strip))
    written = [f"plan written to [bold]{output}[/]"] if output is not None else []
    if plot is not None:
        written.append(f"plot to [bold]{plot}[/]")
    if written:
        out.print(", ".join(written))


def _plan_table(result, name: str, layer_strip) -> Table:
    d = result.details
    table = Table(title=f"Plan: {result.strategy}", show_header=False)
    table.add_row("source", f"{name} ({result.source.get('architecture')}, {result.num_layers} layers)")
    how = result.strategy + (f", ranked by {result.metric}" if result.metric else "")
    if d.get("objective"):
        how += f", measured by {d['objective']}"
    if "search" in d:
        s = d["search"]
        how += f" (pool {s['candidates']}, beam {s['beam']}, held-out check of {s['verify']})"
    table.add_row("strategy", how)
    target = result.target or {}
    table.add_row("target", f"{target.get('kind', '').replace('_', ' ')} {target.get('value')}")
    table.add_row("pairs", ", ".join(f"({p}, {p + 1})" for p in result.pairs))
    table.add_row("layer stack", layer_strip(result.pairs, result.num_layers))
    table.add_row("effective depth", f"{result.effective_depth} blocks (from {result.num_layers})")
    table.add_row("speedup", f"{d['estimated_speedup']:.2f}x (estimate: decode time ∝ layers − {ALPHA}·pairs)")
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
