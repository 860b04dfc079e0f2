"""The lpconvert command line: the Typer app, the options several commands share, and the one place
where errors become exit codes (`stage`).

Each command (pipeline.py: inspect, score, plan, export; quality.py: eval, bench, convert) parses its
options, builds its stage's settings (settings.py: every default and check), calls the stage and
renders the result (render.py tables, plots.py pictures); nothing here computes a figure.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so `--help`
answers at once. Every user error is an LPError: one line on stderr, exit code 2 (1 for a failed
quality gate), no traceback unless --debug; Ctrl-C is exit 130.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .. import __version__
from ..errors import LPError
from ..settings import (
    BenchSettings,
    EvalSettings,
    ExportSettings,
    HealSettings,
    PlanSettings,
    ScoreSettings,
    TaskSettings,
    build,
    defaults_of,
    option_label,
)

# typer vendors click in recent versions: its exception classes are found through one it exports.
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
ClickException, UsageError = _CLICK_ERRORS["ClickException"], _CLICK_ERRORS["UsageError"]


class OneLineErrors(TyperGroup):
    """Usage errors (`--steps abc`, a missing option, an unknown command) as lpconvert's one line and exit
    code 2, instead of click's usage box: a CI log reads the same kind of line for every bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help: nothing to add
                err.print(f"[bold red]error:[/] {escape(_usage_line(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:  # end of input at a prompt
            err.print("[bold red]aborted[/]")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)  # an int is typer.Exit's code; a command returns None


def _usage_line(exc) -> str:
    """click's message with the command it concerns: "No such option: --bogus (see lpconvert export --help)"."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    context = getattr(exc, "ctx", None)
    return f"{message} (see {context.command_path} --help)" if isinstance(exc, UsageError) and context else message


app = typer.Typer(
    cls=OneLineErrors,
    name="lpconvert",
    help="Turn a pretrained Hugging Face causal LM into a faster layer-parallel checkpoint, without retraining.\n\n"
    "Pipeline: [bold]inspect[/] a model, [bold]score[/] its layers and pairs on calibration text, [bold]plan[/] "
    "which pairs to run side by side, [bold]heal[/] the quality they cost, [bold]export[/] the converted checkpoint, then [bold]eval[/] its quality "
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
SCORE_DEFAULTS, PLAN_DEFAULTS, HEAL_DEFAULTS, EXPORT_DEFAULTS, EVAL_DEFAULTS, TASK_DEFAULTS, BENCH_DEFAULTS = (
    defaults_of(cls) for cls in (ScoreSettings, PlanSettings, HealSettings, ExportSettings, EvalSettings,
                                 TaskSettings, BenchSettings))

# ----------------------------------------------------------------------------------------------
# Options shared by several commands, declared once

ModelArg = Annotated[str, typer.Argument(
    help="A Hugging Face folder, a .gguf file or folder, the built-in [bold]smollm2-135m[/], or a hub id.",
    show_default=False)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running the source model's own code.",
                                        rich_help_panel="Source")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.", rich_help_panel="Output")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output that lpconvert wrote (an export folder, a .gguf file, a heal "
    "file and its report, a scores or plan file, a --plot picture); never anything else.",
    rich_help_panel="Output")]
AllowEdgeOpt = Annotated[bool, typer.Option(
    "--allow-edge-layers", help="Allow pairing the first or last layer (most damaging).", rich_help_panel="Pairs")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Runtime")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel="Runtime")]
LoadOpt = Annotated[str, typer.Option(
    help="stream: read one layer at a time from disk and free it (memory flat in depth: a 70B on a small machine); "
         "whole: load the whole model first, where it fits (up to 1.6x faster on a 7B in bfloat16, "
         "docs/benchmarks.md).",
    rich_help_panel="Runtime")]
EngineOpt = Annotated[str, typer.Option(
    help="transformers, or vllm: run the models in vLLM's Transformers backend (a Python with vLLM: this one, or "
         "LPCONVERT_VLLM_PYTHON).", rich_help_panel="Runtime")]
TensorParallelOpt = Annotated[int, typer.Option(
    help="With --engine vllm: devices each model's heads are split over (vLLM's tensor_parallel_size).",
    rich_help_panel="Runtime")]
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
    """Run a command; map LPError to one line + its exit code, and Ctrl-C or SIGTERM (a CI timeout, `kill`)
    to exit 130 with one line, after the command's cleanup has removed what it was writing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..outputs import sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
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


def print_json(data) -> None:
    from ..outputs import strict_json

    print(strict_json(data, default=str))


def show(data, as_json: bool, table) -> None:
    """The result as JSON on stdout (--json), else its table (`table(data)`, from render.py)."""
    if as_json:
        print_json(data)
    else:
        out.print(table(data))


def reporter():
    from ..progress import Reporter

    return Reporter(err, _state["progress"])


def typed_paths(model: str | None) -> list[Path]:
    """The model path as typed, when it is one: protected before the source is even resolved."""
    return [Path(model).expanduser()] if model and Path(model).expanduser().exists() else []


def check_output_folder_early(output: Path, overwrite: bool, model: str) -> None:
    """Refuse a taken or overlapping output path before spending seconds loading the source (the
    stage checks again, with every file of the resolved source, before it writes)."""
    from ..outputs import check_output_folder

    check_output_folder(output, overwrite, typed_paths(model))


def check_output_gguf_early(output: Path, overwrite: bool, model: str) -> None:
    """The GGUF output's checks before the source is read (loading it takes time); again once it is."""
    from ..outputs import check_output_gguf

    check_output_gguf(output, overwrite, typed_paths(model))


def check_output_file_early(path: Path | None, kind, overwrite: bool, model: str | None,
                            *inputs: str | Path | None) -> None:
    """Refuse an output file (of OwnedFile `kind`) that can't be written or would lose data: one of the
    model's files (as typed) or of the command's `inputs`, a link, a model folder, a file lpconvert did not
    write (outputs.check_owned_output), before the work; `check_output_file_against` checks again with the
    resolved source."""
    from ..outputs import check_owned_output

    if path is not None:
        check_owned_output(path, kind, overwrite, typed_paths(model), [Path(p) for p in inputs if p and Path(p).exists()])


def check_output_file_against(source, overwrite: bool, *outputs) -> None:
    """Output files, (path, kind) pairs, against every file of the resolved source (a built-in or Hub model
    has no typed path)."""
    from ..outputs import check_owned_output, protected_paths

    for path, kind in outputs:
        if path is not None:
            check_owned_output(path, kind, overwrite, protected_paths(source))


def check_distinct_outputs(*named: tuple[str, Path | None]) -> None:
    """Two outputs, (option, path) pairs, naming one file: the second would replace the first."""
    seen: dict[Path, str] = {}
    for option, path in named:
        if path is None:
            continue
        key = Path(os.path.abspath(path))
        if key in seen:
            raise LPError(f"{seen[key]} and {option} name the same file, {path}", f"give {option} another name")
        seen[key] = option


def load_converted(model: str, trust_remote_code: bool, report):
    """The converted model of eval and bench: a GGUF export runs in llama.cpp, anything else as load_source."""
    from ..llamacpp import open_exported_gguf

    converted = open_exported_gguf(model)
    if converted is not None:
        report.step(f"loading {model} (llama.cpp)")
        report.end()
        return converted
    return load_source(model, trust_remote_code, report)


def load_source(model: str, trust_remote_code: bool, report=None):
    from ..sources import resolve_model

    if report is None:
        with reporter() as report:
            return load_source(model, trust_remote_code, report)
    report.step(f"loading {model}")
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    report.end()
    return source


def settings_from_options(cls, **values):
    """The stage's settings from the options as typed; a bad value is refused naming its option."""
    return build(cls, values, option_label)




def main() -> None:
    app()
