"""The commands that judge and ship a converted model: eval (quality), bench (speed), convert (all
stages from a recipe, for CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import LPError
from ..settings import BenchSettings, EvalSettings, TaskSettings, build, check_engine, option_label
from .app import (
    BENCH_DEFAULTS,
    EVAL_DEFAULTS,
    TASK_DEFAULTS,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    JsonOpt,
    LoadOpt,
    ModelArg,
    OverwriteOpt,
    SeqLenOpt,
    TensorParallelOpt,
    TextFieldOpt,
    TrustOpt,
    app,
    check_output_folder_early,
    err,
    load_converted,
    load_source,
    out,
    print_json,
    reporter,
    settings_from_options,
    show,
    stage,
)

# ----------------------------------------------------------------------------------------------
# eval


@app.command(name="eval")
@stage
def eval_command(
    source_model: Annotated[str, typer.Argument(metavar="SOURCE", help="The original model.", show_default=False)],
    converted_model: Annotated[str, typer.Argument(metavar="CONVERTED", help="The folder written by export.",
                                                   show_default=False)],
    text: Annotated[str, typer.Option(help="Evaluation text: wiki, news, a file or folder, or a datasets name.",
                                      rich_help_panel="Text")] = EVAL_DEFAULTS["text"],
    split: Annotated[str, typer.Option(help="heldout: the windows calibration never uses; all: every window "
                                            "(for a text never used to calibrate).", rich_help_panel="Text")
                     ] = EVAL_DEFAULTS["split"],
    text_field: TextFieldOpt = EVAL_DEFAULTS["text_field"],
    tokens: Annotated[int, typer.Option(help="Evaluation tokens.", rich_help_panel="Text")] = EVAL_DEFAULTS["tokens"],
    seq_len: SeqLenOpt = EVAL_DEFAULTS["seq_len"],
    prompt: Annotated[str, typer.Option(help="Prompt of the side-by-side generation.",
                                        rich_help_panel="Text")] = EVAL_DEFAULTS["prompt"],
    new_tokens: Annotated[int, typer.Option(
        help="Tokens each model generates from --prompt; 0: no generation (streamed, each new token reads every "
             "layer again).", rich_help_panel="Text")] = EVAL_DEFAULTS["new_tokens"],
    max_ppl_increase: Annotated[str | None, typer.Option(
        help="Gate: fail (exit 1) when perplexity rises more than this, e.g. 10%.", rich_help_panel="Gate",
        show_default=False)] = None,
    min_agreement: Annotated[float | None, typer.Option(
        help="Gate: fail (exit 1) when greedy next-token agreement is below this, e.g. 0.85.",
        rich_help_panel="Gate", show_default=False)] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Score benchmark tasks through lm-evaluation-harness instead of text: core (HellaSwag, ARC-Easy, "
             "ARC-Challenge, PIQA, WinoGrande, LAMBADA), all, or names (see `lpconvert tasks`).",
        rich_help_panel="Tasks", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(
        help="With --tasks: score this many items per task, a fixed sample drawn with --seed (default: all).",
        rich_help_panel="Tasks", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="With --tasks: which items --limit keeps.",
                                      rich_help_panel="Tasks")] = TASK_DEFAULTS["seed"],
    min_retained: Annotated[str | None, typer.Option(
        help="Gate, with --tasks: fail (exit 1) when the converted model keeps less than this share of the "
             "source's average accuracy, e.g. 97%.", rich_help_panel="Gate", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Windows per forward pass (default {EVAL_DEFAULTS['batch_size']}); with --tasks, requests "
             f"(default {TASK_DEFAULTS['batch_size']}).", rich_help_panel="Runtime", show_default=False)] = None,
    device: DeviceOpt = EVAL_DEFAULTS["device"],
    dtype: DtypeOpt = EVAL_DEFAULTS["dtype"],
    load: LoadOpt = EVAL_DEFAULTS["load"],
    engine: EngineOpt = EVAL_DEFAULTS["engine"],
    tensor_parallel: TensorParallelOpt = EVAL_DEFAULTS["tensor_parallel"],
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare a converted model with its source on held-out text: perplexity, agreement, KL, generations;
    with --tasks, on benchmark tasks: accuracy retained. With a bound (--max-ppl-increase, --min-agreement,
    --min-retained) it is a gate: exit 1 when a bound is broken."""
    batch = {} if batch_size is None else {"batch_size": batch_size}  # unset: each kind keeps its own default
    runtime = _check_runtime(EvalSettings, engine, tensor_parallel, device)
    if tasks is not None:
        if runtime["engine"] == "vllm":
            raise LPError("--tasks with --engine vllm is not built yet: lm-evaluation-harness would have to run "
                          "inside vLLM's environment", "score tasks in transformers (drop --engine); --engine vllm "
                          "measures perplexity and agreement")
        _refuse_options("does not apply with --tasks (it bounds the text evaluation)",
                        {"--max-ppl-increase": max_ppl_increase, "--min-agreement": min_agreement})
        settings = settings_from_options(TaskSettings, tasks=tasks, limit=limit, seed=seed, device=device,
                                         dtype=dtype, load=load, min_retained=min_retained, **batch)
        report = _task_report(source_model, converted_model, settings, trust_remote_code)
        from ..render import tasks_table

        show(report, as_json, tasks_table)
    else:
        _refuse_options("needs --tasks", {"--limit": limit, "--min-retained": min_retained})
        settings = settings_from_options(EvalSettings, text=text, split=split, text_field=text_field, tokens=tokens,
                                         seq_len=seq_len, device=device, dtype=dtype, load=load, prompt=prompt, new_tokens=new_tokens,
                                         max_ppl_increase=max_ppl_increase, min_agreement=min_agreement, **batch,
                                         **runtime)
        report = _text_report(source_model, converted_model, settings, trust_remote_code)
        from ..render import eval_table

        show(report, as_json, eval_table)
    if not report["passed"]:
        err.print(f"[bold red]gate failed:[/] {escape('; '.join(report['failures']))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _refuse_options(problem: str, given: dict) -> None:
    for option, value in given.items():
        if value is not None:
            raise LPError(f"{option} {problem}", f"drop {option}, or run eval once per kind of evaluation")


def _check_runtime(cls, engine: str, tensor_parallel: int, device: str) -> dict:
    """--engine and --tensor-parallel as the stage's settings check them (a recipe's eval.engine the same way), then
    together with --device, and vLLM found: all before anything loads. The values for `cls`'s settings."""
    from ..vllmengine import vllm_python

    runtime = settings_from_options(cls, engine=engine, tensor_parallel=tensor_parallel)
    check_engine(runtime.engine, runtime.tensor_parallel, device)
    if runtime.engine == "vllm":
        vllm_python()  # vLLM is there, or one line now
    return {"engine": runtime.engine, "tensor_parallel": runtime.tensor_parallel}


def _text_report(source_model: str, converted_model: str, settings: EvalSettings, trust_remote_code: bool) -> dict:
    from ..evaluate import evaluate

    with reporter() as progress:
        source = load_source(source_model, trust_remote_code, progress)
        converted = load_converted(converted_model, trust_remote_code, progress)
        if settings.engine == "vllm":
            return evaluate(source, converted, settings, lambda text: progress.step("evaluating in vLLM", detail=text))
        from ..evaluate import check_eval_memory
        from ..runtime import resolve_device

        progress.note(check_eval_memory(source, converted, settings, resolve_device(settings.device)))  # before work
        unit = "batches" if settings.load == "whole" else "layers"  # streamed: every window through a layer at a time
        return evaluate(source, converted, settings, progress.counter("evaluating both models", unit))


def _task_report(source_model: str, converted_model: str, settings: TaskSettings, trust_remote_code: bool) -> dict:
    from ..accuracy import as_steps, check_installed, resolve_tasks, task_accuracy

    check_installed()  # before loading anything: a missing extra is one line at once
    resolve_tasks(settings.tasks)
    from ..outputs import written_gguf

    if written_gguf(Path(converted_model).expanduser()):  # a GGUF transformers reads (a source's) is scored
        raise LPError("--tasks scores models in transformers through lm-evaluation-harness, not a GGUF",
                      "score the safetensors export of the same plan (lpconvert export ... -o FOLDER), or the GGUF "
                      "without --tasks")
    with reporter() as progress:
        source = load_source(source_model, trust_remote_code, progress)
        converted = load_source(converted_model, trust_remote_code, progress)
        return task_accuracy(source, converted, settings, as_steps(progress.step))


# ----------------------------------------------------------------------------------------------
# tasks


@app.command(name="tasks")
@stage
def tasks_command(
    path: Annotated[bool, typer.Option("--path", help="Print only the folder of the task definitions, for "
                                                      "`lm_eval --include_path`.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The benchmark tasks `eval --tasks` can score, with the items installed for each, and the folder of their
    lm-evaluation-harness definitions."""
    from ..accuracy import harness_path, list_tasks

    if path:
        print(harness_path())
        return
    with reporter() as progress:
        progress.step("reading the installed benchmark data")
        listing = {"tasks": list_tasks(), "include_path": str(harness_path())}
        progress.end()
    from ..render import task_list_table

    show(listing, as_json, task_list_table)


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
                          ] = ",".join(map(str, BENCH_DEFAULTS["batch_sizes"])),
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens.", rich_help_panel="Workload")] = BENCH_DEFAULTS["prompt_len"],
    new_tokens: Annotated[int, typer.Option(help="Generated tokens.", rich_help_panel="Workload")] = BENCH_DEFAULTS["new_tokens"],
    warmup: Annotated[int, typer.Option(help="Warm-up runs.", rich_help_panel="Workload")] = BENCH_DEFAULTS["warmup"],
    repeats: Annotated[int, typer.Option(help="Timed runs (median reported).", rich_help_panel="Workload")
                       ] = BENCH_DEFAULTS["repeats"],
    compile_: Annotated[bool, typer.Option("--compile", help="Static cache, compiled decode step.",
                                           rich_help_panel="Runtime")] = BENCH_DEFAULTS["compile"],
    device: DeviceOpt = BENCH_DEFAULTS["device"],
    dtype: DtypeOpt = BENCH_DEFAULTS["dtype"],
    engine: EngineOpt = BENCH_DEFAULTS["engine"],
    tensor_parallel: TensorParallelOpt = BENCH_DEFAULTS["tensor_parallel"],
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prefill and decode tokens/s with transformers generate, eager or compiled, or in vLLM (--engine vllm, each
    model in its own engine, rounds interleaved; --compile: vLLM's compiled mode); with a baseline, the speedup."""
    from ..bench import bench_models, bench_models_vllm, bench_random_weights
    from ..render import bench_table

    if (model is None) == (random_weights is None):
        raise LPError("give MODEL or --random-weights SHAPE (one of them)", "e.g. lpconvert bench out/ --baseline src/")
    runtime = _check_runtime(BenchSettings, engine, tensor_parallel, device)
    if runtime["engine"] == "vllm" and random_weights is not None:
        raise LPError("--random-weights builds models in transformers, in memory; vLLM loads folders",
                      "export a model folder and bench it with --engine vllm, or drop --engine")
    counts = _comma_ints(pair_counts, "--pair-counts")
    labels = {"batch_sizes": "--batch-size", "compile": "--compile"}
    settings = build(BenchSettings, dict(batch_sizes=_comma_ints(batch_size, "--batch-size"), prompt_len=prompt_len,
                                         new_tokens=new_tokens, warmup=warmup, repeats=repeats, compile=compile_,
                                         device=device, dtype=dtype, **runtime),
                     lambda key: labels.get(key, option_label(key)))
    with reporter() as progress:
        def note(text: str) -> None:
            progress.step("benchmarking", detail=text)

        if random_weights is not None:
            report = bench_random_weights(random_weights, counts, settings, note)
        else:
            target = load_converted(model, trust_remote_code, progress)
            base = load_converted(baseline, trust_remote_code, progress) if baseline is not None else None
            if settings.engine == "vllm":
                report = bench_models_vllm(target, base, settings, note)
            else:
                report = bench_models(target, base, settings, note)
    show(report, as_json, bench_table)


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
    """score -> plan -> [heal ->] export -> eval in one step, for CI. Exit 0: converted and passed the gate;
    1: the gate failed (nothing written unless --keep-failed); 2: bad input."""
    from ..convert import convert as run_convert
    from ..convert import load_recipe
    from ..render import eval_table, heal_table, tasks_table

    settings = load_recipe(recipe)
    check_output_folder_early(output, overwrite, model)
    with reporter() as progress:
        source = load_source(model, trust_remote_code, progress)
        # A failed gate raises GateFailed, an LPError with exit code 1, and leaves nothing at OUT.
        summary = run_convert(source, output, settings, overwrite=overwrite, keep_failed=keep_failed,
                              progress=progress.step)
    if as_json:
        print_json(summary)
    else:
        if summary["heal"]:
            out.print(heal_table(summary["heal"]))
        out.print(eval_table(summary["eval"]))
        if summary["tasks"]:
            out.print(tasks_table(summary["tasks"]))
        out.print(f"converted model in [bold]{output}[/]: {len(summary['pairs'])} pairs, "
                  f"{summary['effective_depth']} blocks (recipe, scores, plan and eval report alongside)")
    if not summary["passed"]:
        err.print(f"[bold red]gate failed[/] (kept because of --keep-failed): {escape('; '.join(summary['failures']))}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
