"""The commands that make a converted model, in pipeline order: inspect, score, plan, heal, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LPError
from ..settings import OBJECTIVES, ExportSettings, HealSettings, PlanSettings, ScoreSettings
from .app import (
    EXPORT_DEFAULTS,
    HEAL_DEFAULTS,
    PLAN_DEFAULTS,
    SCORE_DEFAULTS,
    AllowEdgeOpt,
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LoadOpt,
    ModelArg,
    OverwriteOpt,
    SeedOpt,
    SeqLenOpt,
    TextFieldOpt,
    TrustOpt,
    app,
    check_distinct_outputs,
    check_output_file_against,
    check_output_file_early,
    check_output_folder_early,
    check_output_gguf_early,
    err,
    load_source,
    out,
    print_json,
    reporter,
    settings_from_options,
    show,
    stage,
    typed_paths,
)

NAMED_OBJECTIVES = ("top1_copy", "top1", "kl", "loss")  # plan --objective's help says what these are

# ----------------------------------------------------------------------------------------------
# inspect


@app.command()
@stage
def inspect(model: ModelArg, trust_remote_code: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Describe a model: architecture, whether lpconvert supports it, shapes, dtype, size."""
    from ..describe import describe_model
    from ..render import description_table

    show(describe_model(load_source(model, trust_remote_code)), as_json, description_table)


# ----------------------------------------------------------------------------------------------
# score


@app.command()
@stage
def score(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores JSON.",
                                         rich_help_panel="Output")] = Path("scores.json"),
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, news, a .txt/.jsonl/.json file or folder, "
                                             "or a datasets name.", rich_help_panel="Text")] = SCORE_DEFAULTS["calib"],
    text_field: TextFieldOpt = SCORE_DEFAULTS["text_field"],
    tokens: Annotated[int, typer.Option(help="Calibration tokens.", rich_help_panel="Text")] = SCORE_DEFAULTS["tokens"],
    seq_len: SeqLenOpt = SCORE_DEFAULTS["seq_len"],
    seed: SeedOpt = SCORE_DEFAULTS["seed"],
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: angular_distance, block_influence, pair_error, loss.",
        rich_help_panel="Metrics")] = ",".join(SCORE_DEFAULTS["metrics"]),
    measure_loss: Annotated[bool, typer.Option(
        "--measure-loss", help="Also measure the calibration loss with each single pair in parallel (slow, decisive).",
        rich_help_panel="Metrics")] = SCORE_DEFAULTS["measure_loss"],
    loss_tokens: Annotated[int, typer.Option(help="Token budget of --measure-loss.",
                                             rich_help_panel="Metrics")] = SCORE_DEFAULTS["loss_tokens"],
    batch_size: BatchOpt = SCORE_DEFAULTS["batch_size"],
    device: DeviceOpt = SCORE_DEFAULTS["device"],
    dtype: DtypeOpt = SCORE_DEFAULTS["dtype"],
    load: LoadOpt = SCORE_DEFAULTS["load"],
    device_map: Annotated[str | None, typer.Option(
        help="'auto' spreads a model too large for one device (accelerate).", rich_help_panel="Runtime",
        show_default=False)] = SCORE_DEFAULTS["device_map"],
    plot: Annotated[Path | None, typer.Option(help="Also draw the scores into this picture (.png, .svg or .pdf).",
                                              rich_help_panel="Output", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure how much each layer and each candidate pair matters, on calibration text."""
    from ..outputs import SCORES_OUTPUT, write_json_atomically
    from ..plots import SCORES_PLOT, plot_scores
    from ..render import scores_table
    from ..runtime import resolve_device
    from ..score import check_score_memory, compute_scores

    settings = settings_from_options(
        ScoreSettings, calib=calib, text_field=text_field, tokens=tokens, seq_len=seq_len, seed=seed,
        batch_size=batch_size, device=device, dtype=dtype, device_map=device_map, load=load,
        metrics=[name.strip() for name in metrics.split(",") if name.strip()], measure_loss=measure_loss,
        loss_tokens=loss_tokens)
    outputs = ((output, SCORES_OUTPUT), (plot, SCORES_PLOT))
    check_distinct_outputs(("-o", output), ("--plot", plot))
    for path, kind in outputs:  # before the scoring, not after it
        check_output_file_early(path, kind, overwrite, model, calib)
    with reporter() as report:
        source = load_source(model, trust_remote_code, report)
        check_output_file_against(source, overwrite, *outputs)
        report.note(check_score_memory(source, settings, resolve_device(settings.device)))  # what it will hold
        scores = compute_scores(source, settings, report.step)
    write_json_atomically(output, scores, SCORES_OUTPUT, overwrite)
    if plot is not None:
        plot_scores(scores, plot, overwrite)
    if as_json:
        print_json({k: scores[k] for k in ("model", "calibration", "base", "safest_pairs", "agreement_with_loss",
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
        rich_help_panel="Strategy", show_default=False)] = PLAN_DEFAULTS["strategy"],
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Per-pair metric of the scores used to rank pairs: loss_increase, pair_rel_l2, pair_cosine "
        "or angular_distance. Default: loss_increase when the scores have it, else pair_cosine (the cheap metric "
        "that agreed best with measured loss on SmolLM2).",
        rich_help_panel="Strategy", show_default=False)] = PLAN_DEFAULTS["metric"],
    allow_edge_layers: AllowEdgeOpt = PLAN_DEFAULTS["allow_edge_layers"],
    model: Annotated[str | None, typer.Option(
        "--model", help="The scored model; lets the planner measure pair sets (needed by search).",
        rich_help_panel="Measuring", show_default=False)] = None,
    objective: Annotated[str, typer.Option(
        help="What measuring minimises: top1_copy (how often the most likely next token changes, plus the loss on "
        "words the window already holds; its plans kept benchmark accuracy on both real models), top1 (the first "
        "part alone), kl (divergence from the source's next-token distribution), loss (calibration NLL, the "
        f"paper's perplexity sweep), or {', '.join(o for o in OBJECTIVES if o not in NAMED_OBJECTIVES)} "
        "(docs/quality.md compares them).",
        rich_help_panel="Measuring")] = PLAN_DEFAULTS["objective"],
    candidates: Annotated[int, typer.Option(help="Search: the pairs the later steps choose among, the best of the "
                                            "first step's (which measures every pair alone).",
                                            rich_help_panel="Measuring")] = PLAN_DEFAULTS["candidates"],
    beam: Annotated[int, typer.Option(help="Search: sets kept at each step (2 keeps a runner-up path: a pair "
                                           "that is best alone can block two better ones).",
                                      rich_help_panel="Measuring")] = PLAN_DEFAULTS["beam"],
    verify: Annotated[int, typer.Option(
        help="Search: best sets of each step re-measured on the calibration text's held-out split before one is "
        "kept (0: off).", rich_help_panel="Measuring")] = PLAN_DEFAULTS["verify"],
    calib: Annotated[str, typer.Option(help="Calibration text: wiki, a .txt/.jsonl/.json file or folder, or a "
                                            "datasets name.", rich_help_panel="Text")] = PLAN_DEFAULTS["calib"],
    tokens: Annotated[int, typer.Option(
        help="Calibration tokens every candidate set is measured on (the search's screening).",
        rich_help_panel="Text")] = PLAN_DEFAULTS["tokens"],
    heldout_tokens: Annotated[int, typer.Option(
        help="Held-out tokens (same text, windows calibration never uses) the --verify best sets of each search "
        "step are re-measured on; they then count with the calibration tokens.",
        rich_help_panel="Text")] = PLAN_DEFAULTS["heldout_tokens"],
    seq_len: SeqLenOpt = PLAN_DEFAULTS["seq_len"],
    seed: SeedOpt = PLAN_DEFAULTS["seed"],
    batch_size: BatchOpt = PLAN_DEFAULTS["batch_size"],
    device: DeviceOpt = PLAN_DEFAULTS["device"],
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16.",
                                       rich_help_panel="Runtime")] = PLAN_DEFAULTS["dtype"],
    load: LoadOpt = PLAN_DEFAULTS["load"],
    plot: Annotated[Path | None, typer.Option(help="Also draw calibration perplexity against effective depth "
                                                   "(the quality/depth front) into this picture (.png, .svg or .pdf).",
                                              rich_help_panel="Output", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose which consecutive layers to pair, for a target depth, speedup or loss budget."""
    from ..formats import layer_strip, load_scores, source_fingerprint
    from ..outputs import PLAN_OUTPUT, write_json_atomically
    from ..plan import ALPHA, parse_target, plan_stage
    from ..plots import FRONT_PLOT, plot_front
    from ..render import plan_table

    target = parse_target(pairs, depth, speedup, max_loss_increase)
    settings = settings_from_options(
        PlanSettings, strategy=strategy, metric=metric, objective=objective, candidates=candidates, beam=beam,
        verify=verify, allow_edge_layers=allow_edge_layers, calib=calib, tokens=tokens,
        heldout_tokens=heldout_tokens, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device,
        dtype=dtype, load=load, use_model=model is not None)
    if output is None and not as_json:
        raise LPError("give -o plan.json (or --json to print the plan)", "e.g. lpconvert plan scores.json -o plan.json")
    outputs = ((output, PLAN_OUTPUT), (plot, FRONT_PLOT))
    check_distinct_outputs(("-o", output), ("--plot", plot))
    for path, kind in outputs:
        check_output_file_early(path, kind, overwrite, model, scores, calib)
    with reporter() as progress:
        source = load_source(model, trust_remote_code, progress) if model is not None else None
        if source is not None:
            check_output_file_against(source, overwrite, *outputs)
        scores_data = load_scores(scores, source_fingerprint(source.config, source.store) if source else None)
        if plot is not None and source is None and not any("loss_increase" in p for p in scores_data["pairs"]):
            raise LPError("--plot needs measured losses: none are known for this plan",  # before -o is written
                          "pass --model, or scores measured with --measure-loss")
        result = plan_stage(scores_data, target, settings, source, scores_path=f"scores {scores}",
                            progress=lambda message: progress.step("planning", detail=message))
    data = result.to_json()
    if output is not None:
        write_json_atomically(output, data, PLAN_OUTPUT, overwrite)
    if plot is not None:
        plot_front(data, scores_data, plot, overwrite)
    if as_json:
        print_json(data)
        return
    name = model or scores_data.get("model", {}).get("name", "?")
    out.print(plan_table(data, name, layer_strip(result.pairs, result.num_layers), ALPHA))
    written = [f"plan written to [bold]{output}[/]"] if output is not None else []
    if plot is not None:
        written.append(f"plot to [bold]{plot}[/]")
    if written:
        out.print(", ".join(written))


# ----------------------------------------------------------------------------------------------
# heal


@app.command()
@stage
def heal(
    model: ModelArg,
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON from `lpconvert plan` (the pairs to heal).",
                                       show_default=False, rich_help_panel="Pairs")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The heal file to write (.safetensors); its report "
                                         "goes beside it as .json.", show_default=False, rich_help_panel="Output")],
    method: Annotated[str, typer.Option(help="lsq: least-squares refit of each pair's down_proj (training-free, "
                                        "minutes); distill: lsq, then a KL fine-tune of the pairs' projections "
                                        "(--train).", rich_help_panel="Method")] = HEAL_DEFAULTS["method"],
    target: Annotated[str, typer.Option(help="lsq target: local (the pair's two layers in sequence) or global "
                                        "(the source's own stream after the pair).", rich_help_panel="Method")
                      ] = HEAL_DEFAULTS["target"],
    damping: Annotated[str, typer.Option(help="Ridge strengths to try per pair (multiples of the Gram's mean "
                                         "diagonal); the held-out windows choose.", rich_help_panel="Method")
                       ] = ",".join(f"{d:g}" for d in HEAL_DEFAULTS["damping"]),
    train: Annotated[str, typer.Option(help="distill trains each pair's fused projections: all (q/k/v, o, gate/up, "
                                       "down) or output (o and down only: less memory).", rich_help_panel="Method")
                     ] = HEAL_DEFAULTS["train"],
    steps: Annotated[int, typer.Option(help="distill: optimizer steps (one window each).", rich_help_panel="Method")
                     ] = HEAL_DEFAULTS["steps"],
    lr: Annotated[float, typer.Option(help="distill: Adam learning rate.", rich_help_panel="Method")
                  ] = HEAL_DEFAULTS["lr"],
    calib: Annotated[str, typer.Option(help="Calibration text (its held-out windows judge each correction).",
                                       rich_help_panel="Text")] = HEAL_DEFAULTS["calib"],
    text_field: TextFieldOpt = HEAL_DEFAULTS["text_field"],
    tokens: Annotated[int, typer.Option(help="Calibration tokens the corrections are fitted on.",
                                        rich_help_panel="Text")] = HEAL_DEFAULTS["tokens"],
    heldout_tokens: Annotated[int, typer.Option(help="Held-out tokens that choose and accept each correction.",
                                                rich_help_panel="Text")] = HEAL_DEFAULTS["heldout_tokens"],
    seq_len: SeqLenOpt = HEAL_DEFAULTS["seq_len"],
    seed: SeedOpt = HEAL_DEFAULTS["seed"],
    batch_size: BatchOpt = HEAL_DEFAULTS["batch_size"],
    device: DeviceOpt = HEAL_DEFAULTS["device"],
    dtype: DtypeOpt = HEAL_DEFAULTS["dtype"],
    load: LoadOpt = HEAL_DEFAULTS["load"],
    plot: Annotated[Path | None, typer.Option(help="Also draw held-out perplexity before and after each pair "
                                                   "(.png, .svg or .pdf).",
                                              rich_help_panel="Output", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Win back the quality the plan's pairs cost: refit the pairs' weights on calibration text (lsq: down_proj by
    least squares; distill: then a KL fine-tune). Writes only the replaced weights; `lpconvert export --heal`
    applies them."""
    from ..formats import load_plan, plan_for_source, source_fingerprint
    from ..healfile import HEAL_REPORT, check_heal_outputs, write_heal_file
    from ..outputs import protected_paths, write_json_atomically
    from ..plots import HEAL_PLOT, plot_heal
    from ..render import heal_table

    settings = settings_from_options(
        HealSettings, method=method, target=target, damping=_comma_numbers(damping, "--damping"), train=train, steps=steps,
        lr=lr, calib=calib, text_field=text_field, tokens=tokens, heldout_tokens=heldout_tokens, seq_len=seq_len,
        seed=seed, batch_size=batch_size, device=device, dtype=dtype, load=load)
    loaded_plan = load_plan(plan)
    inputs = [Path(p) for p in (plan, calib) if p and Path(p).exists()]
    report_path = check_heal_outputs(output, overwrite, typed_paths(model), inputs)
    check_distinct_outputs(("-o", output), ("the heal report beside -o", report_path), ("--plot", plot))
    check_output_file_early(plot, HEAL_PLOT, overwrite, model, plan, calib)
    with reporter() as progress:
        source = load_source(model, trust_remote_code, progress)
        check_heal_outputs(output, overwrite, protected_paths(source))
        check_output_file_against(source, overwrite, (plot, HEAL_PLOT))
        chosen = plan_for_source(source_fingerprint(source.config, source.store), plan=loaded_plan,
                                 plan_name=f"plan {plan}", allow_edge_layers=True)
        from ..heal import heal as run_heal
        from ..heal.stage import check_heal_memory
        from ..runtime import resolve_device

        progress.note(check_heal_memory(source, settings, resolve_device(settings.device)))  # what it will hold
        result = run_heal(source, chosen, settings, progress=lambda message: progress.step("healing", detail=message))
    write_heal_file(output, result.tensors, result.header, overwrite)
    report = {**result.report, "output": str(output)}
    write_json_atomically(report_path, report, HEAL_REPORT, overwrite)
    if plot is not None:
        plot_heal(report, plot, overwrite)
    if as_json:
        print_json(report)
        return
    out.print(heal_table(report))
    out.print(f"heal file written to [bold]{output}[/], report to [bold]{report_path}[/]"
              + (f", plot to [bold]{plot}[/]" if plot else ""))


def _comma_numbers(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LPError(f"{option} '{text}' is not a comma-separated list of numbers",
                      f"write e.g. {option} 0.3,1,3") from None


# ----------------------------------------------------------------------------------------------
# export


def _names_an_export(model: str) -> bool:
    """Whether MODEL is a local folder whose config.json is an lpconvert export's (it has lp_blocks): read before
    the model is loaded, so that an export, which needs no --plan or --pairs, is told apart from a source that does."""
    import json

    config = Path(model).expanduser() / "config.json"
    try:
        return config.is_file() and "lp_blocks" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):  # unreadable or no JSON object: loading it says why
        return False


def _check_export_of_export(model: str, gguf: bool, plan: Path | None, pairs: str | None, heal: Path | None) -> None:
    """An lpconvert export's blocks are already joined: they are written to a GGUF as they are (a fine-tuned export
    too), and are no source layers to pair again or to copy into another safetensors folder."""
    if not gguf:
        raise LPError(f"{model} is already an lpconvert export (its blocks are pairs joined as wide layers), not a "
                      "source to export again as a folder",
                      "load it as it is with AutoModelForCausalLM or vLLM, or write it for llama.cpp with -o FILE.gguf")
    if plan is not None or (pairs is not None and pairs.strip().lower() != "none"):
        raise LPError(f"{model} is an lpconvert export, whose blocks are already joined: "
                      f"{'--plan' if plan is not None else '--pairs'} cannot pair them again (its GGUF holds them as "
                      "they are)",
                      "leave out --plan and --pairs, or pass --pairs none; to pair other layers, export the original "
                      "model")
    if heal is not None:
        raise LPError(f"{model} is an lpconvert export: --heal replaces a source's pair projections as it is exported, "
                      "and an export's are already written", "leave out --heal, or export the original model with it")


@app.command()
@stage
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the checkpoint to, or a .gguf file.",
                                         show_default=False, rich_help_panel="Output")],
    plan: Annotated[Path | None, typer.Option("--plan", help="Plan JSON from `lpconvert plan`.",
                                              rich_help_panel="Pairs", show_default=False)] = None,
    pairs: Annotated[str | None, typer.Option(
        "--pairs", help="First layer of each pair, e.g. 12,14,16 (12 pairs layers 12 and 13); 'none' for a copy. "
        "An lpconvert export (fine-tuned or not) needs neither --pairs nor --plan: -o FILE.gguf writes its blocks.",
        rich_help_panel="Pairs", show_default=False)] = None,
    allow_edge_layers: AllowEdgeOpt = False,
    heal_file: Annotated[Path | None, typer.Option(
        "--heal", help="Heal file from `lpconvert heal` for this plan: its weights replace the pairs' projections.",
        rich_help_panel="Pairs", show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="auto (keep the source dtype), float32, bfloat16 or float16.",
                                       rich_help_panel="Output")] = EXPORT_DEFAULTS["dtype"],
    max_shard_size: Annotated[str, typer.Option(help="Largest shard file, e.g. 5GB or 500MB.",
                                                rich_help_panel="Output")] = EXPORT_DEFAULTS["max_shard_size"],
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the tokenizer files next to the weights.",
                                                 rich_help_panel="Output")] = EXPORT_DEFAULTS["copy_tokenizer"],
    output_format: Annotated[str, typer.Option(
        "--format", help="safetensors (a folder for transformers), gguf (one file for llama.cpp), or auto: gguf "
        "when OUT ends in .gguf.", rich_help_panel="Output")] = EXPORT_DEFAULTS["format"],
    gguf_type: Annotated[str, typer.Option(help="GGUF only: how matrices are stored: f32, f16, bf16 or q8_0.",
                                           rich_help_panel="Output")] = EXPORT_DEFAULTS["gguf_type"],
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the block layout and shard plan; write nothing.",
                                          rich_help_panel="Output")] = False,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a layer-parallel checkpoint: each pair becomes one wide block, loadable with
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); or, with -o FILE.gguf, one GGUF
    file that stock llama.cpp runs (architecture deci). MODEL may also be an lpconvert export (e.g. one
    fine-tuned and merged): `lpconvert export EXPORT -o FILE.gguf` writes its blocks as they are."""
    from ..export import export as run_export
    from ..formats import layer_strip, load_plan, parse_pairs, plan_for_source, source_fingerprint
    from ..healfile import load_heal_file
    from ..render import export_table

    if (plan is None) == (pairs is None) and not (plan is None and _names_an_export(model)):
        raise LPError("give exactly one of --plan and --pairs", "e.g. --pairs 12,14 or --plan plan.json")
    if pairs is not None and not pairs.strip():
        raise LPError("--pairs is empty", "give pair starts such as --pairs 12,14, or --pairs none for an exact copy")
    loaded_plan = load_plan(plan) if plan is not None else None
    healing = load_heal_file(heal_file) if heal_file is not None else None
    wanted = None if pairs is None or pairs.strip().lower() == "none" else parse_pairs(pairs)
    settings = settings_from_options(ExportSettings, dtype=dtype, max_shard_size=max_shard_size,
                                     copy_tokenizer=copy_tokenizer, format=output_format, gguf_type=gguf_type)
    gguf = settings.output_format(output) == "gguf"
    _refuse_other_format_options(gguf, dtype=dtype, max_shard_size=max_shard_size, copy_tokenizer=copy_tokenizer,
                                 gguf_type=gguf_type)
    if gguf:
        check_output_gguf_early(output, overwrite, model)
    else:
        check_output_folder_early(output, overwrite, model)
    with reporter() as progress:
        source = load_source(model, trust_remote_code, progress)
        if source.kind == "lpconvert":  # its blocks as they are, fine-tuned or not
            _check_export_of_export(model, gguf, plan, pairs, heal_file)
            from ..ggufexport import export_gguf_of_export

            report = export_gguf_of_export(source, output, gguf_type=settings.gguf_type, overwrite=overwrite,
                                           dry_run=dry_run, progress=progress.counter("writing weights", "bytes"))
            pairs_shown = [p[0] for p in report.pairs]
            source_line = f"{source.name} (an lpconvert export, {report.num_layers} layers in {len(report.blocks)} blocks)"
        else:
            if plan is None and pairs is None:  # a folder that looked like an export, and is not one
                raise LPError("give exactly one of --plan and --pairs", "e.g. --pairs 12,14 or --plan plan.json")
            chosen = plan_for_source(source_fingerprint(source.config, source.store), plan=loaded_plan,
                                     plan_name=f"plan {plan}", pairs=wanted, allow_edge_layers=allow_edge_layers)
            if not chosen.pairs:
                progress.end()
                err.print("[yellow]warning:[/] the plan has no pairs; the export is an exact copy "
                          + ("of the source as a deci GGUF (the baseline)" if gguf else "in lpconvert's format"))
            writing = progress.counter("writing weights", "bytes")
            if gguf:
                from ..ggufexport import export_gguf

                report = export_gguf(source, chosen, output, gguf_type=settings.gguf_type, overwrite=overwrite,
                                     dry_run=dry_run, heal=healing, progress=writing)
            else:
                report = run_export(source, chosen, output, dtype=settings.dtype,
                                    max_shard_size=settings.max_shard_size, copy_tokenizer_files=settings.copy_tokenizer,
                                    overwrite=overwrite, dry_run=dry_run, heal=healing, progress=writing)
            pairs_shown = chosen.pairs
            source_line = f"{source.name} ({source.config.model_type}, {chosen.num_layers} layers)"
    if as_json:
        print_json(report.to_json())
        return
    out.print(export_table(report.to_json(), source_line, layer_strip(pairs_shown, report.num_layers)))
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}")


def _refuse_other_format_options(gguf: bool, **given) -> None:
    """Options of the other format, given with a value other than their default, are one clear line."""
    other = ("dtype", "max_shard_size", "copy_tokenizer") if gguf else ("gguf_type",)
    changed = [name for name in other if given[name] != EXPORT_DEFAULTS[name]]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        if gguf:
            raise LPError(f"{flag} applies to the safetensors format, and this export writes a GGUF",
                          "choose how the GGUF stores its matrices with --gguf-type f32|f16|bf16|q8_0")
        raise LPError(f"{flag} applies to a GGUF export, and this export writes a safetensors folder",
                      "write to a path ending in .gguf, or pass --format gguf")
