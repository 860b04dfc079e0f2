"""Regenerate docs/errors.md: run every bad-input case of tests/test_errors.py through the CLI and
record the exact one-line message and exit code.

    python scripts/results/errors_table.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
# As the tests run: offline, and no progress lines before the error (a CI log shows them first).
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LPCONVERT_PROGRESS="off")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from builders import save_tiny_models  # noqa: E402
from test_errors import CASES, FAULTS, cuda_without_gpu, fault_export, raising_writer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import lpconvert.checkpoint as checkpoint  # noqa: E402
from lpconvert.cli import app  # noqa: E402

ISSUE_CASE = {  # which numbered case of issue 7 each test case shows
    "missing_model": 1, "model_is_a_file": 1, "folder_without_config": 1, "config_not_json": 2,
    "config_does_not_match_weights": 2, "config_size_not_a_positive_integer": 2, "tokenizer_corrupt": 2,
    "unsupported_architecture": 3, "quantized_checkpoint": 3, "truncated_safetensors": 4,
    "corrupt_header": 4, "header_length_beyond_file": 4, "index_names_missing_tensor": 4,
    "index_path_traversal": 5, "pickle_needing_more_than_weights": 6, "remote_code_without_flag": 7,
    "nan_in_paired_weights": 8, "plan_malformed": 9, "plan_wrong_schema": 9, "plan_for_another_model": 9,
    "pairs_overlap": 10, "pairs_out_of_range": 10, "pair_negative": 10, "plan_pair_not_consecutive": 10,
    "edge_layer": 10, "output_is_a_file": 13, "output_exists": 13, "output_parent_missing": 13, "bad_dtype": 18,
    "calibration_missing": 16, "calibration_empty": 16, "calibration_binary": 16, "calibration_too_short": 16,
    "dataset_offline": 17, "bad_device": 18, "too_many_pairs": 11, "scores_malformed": 12,
    "scores_for_another_model": 12, "recipe_malformed": 19, "recipe_unknown_key": 19,
    "eval_different_vocab_sizes": 20, "eval_different_tokenizers": 20,
}


# Cases that came from the commands' own bad-input tables (test_cli's BAD_EXPORTS, test_plan's BAD_PLANS, and
# the bad-input tests of test_plan, test_score, test_bench, test_progress and test_cli) when the tables were merged.
FROM_COMMAND_TESTS = {
    "pairs_and_plan_both_given", "pairs_and_plan_both_missing", "pair_far_out_of_range", "edge_layer_first",
    "pairs_not_numbers", "dtype_float8", "max_shard_size_not_a_size", "plan_missing", "plan_two_targets",
    "plan_no_target", "plan_depth_too_shallow", "plan_speedup_out_of_reach", "plan_unknown_strategy",
    "plan_unknown_metric", "plan_unknown_objective", "plan_search_without_model",
    "plan_loss_increase_not_a_percentage", "plan_without_output", "plan_beam_zero", "scores_missing",
    "scores_file_is_a_plan", "scores_without_losses_for_a_loss_target", "score_unknown_metric",
    "bench_without_model", "bench_unknown_shape", "bench_pair_counts_do_not_fit", "bench_batch_size_not_numbers",
    "inspect_missing_model", "progress_mode_unknown",
}


# Cases added with a later stage, by the start of their name: the issue that added the stage.
ADDED_WITH = {"16": ("heal_", "export_heal_", "recipe_heal_"), "13": ("tasks_", "recipe_tasks_"),
              "14": ("export_gguf_", "recipe_gguf_")}


# Issue 23 (the reliability round) added every case from this one on, in the order of tests/test_errors.py;
# later issues' cases, named by their start, are theirs (24: serving, 25: Gemma 3).
FIRST_OF_ISSUE_23 = "heal_output_in_another_models_folder"
LATER_ISSUES = {"24": ("vllm_",), "25": ("gemma3_", "vllm_sandwich_")}


# Issue 32's findings that are not one command's bad input (a signal, a Python call, a native crash): what happens
# now, and the test that holds it. Hand-written: the tests named assert each behaviour.
BEYOND_THE_TABLE = [
    "## Beyond one command's input (issue 32)", "",
    "| finding | what happens now | test |", "|---|---|---|",
    "| llama.cpp crashes (native code: SIGSEGV, SIGILL, abort), e.g. q8_0 on an AMX CPU with repacking on | llama.cpp "
    "runs in a process of its own: `error: llama.cpp crashed with SIGSEGV while running logits on lp.gguf (in its own "
    "process: lpconvert is fine) (export with --gguf-type f16 and run it again, ...; docs/gguf.md)`, exit 2; on AMX "
    "CPUs repacking is off by default, so q8_0 runs | `tests/test_native_crash.py` (real crashes of the child; a "
    "pytest run goes on past a crashing test) |",
    "| 3.4 `m.load_state_dict(m.state_dict())` on a loaded export (and `strict=False`, as Trainer uses) | takes back "
    "every key: nothing is fused at load, modules and state dict are the checkpoint's tensors | "
    "`tests/test_export.py::test_a_loaded_export_takes_back_its_own_state_dict` (Llama, Gemma 3, strict and not) |",
    "| 3.10 Ctrl-C or SIGTERM during `--engine vllm` | exit 130, `interrupted: nothing was written at the output "
    "path`; the worker's whole process group (EngineCore, TP workers) is stopped first | `tests/test_serving.py::"
    "test_interrupt_stops_the_vllm_worker_and_everything_it_started` |",
    "| 3.11 the vLLM worker killed (`kill -9`) | noticed within 0.1 s of polling: `vLLM's worker was killed by signal "
    "9 (SIGKILL), not by lpconvert ...`, exit 2 (was 313 s) | `tests/test_serving.py::"
    "test_a_killed_vllm_worker_is_noticed_at_once` |",
    "| 3.12 a `lpconvert-vllm-*` folder left after every run | removed when the job succeeds, kept and named only when "
    "it fails | `tests/test_serving.py::test_a_vllm_job_that_succeeds_leaves_no_folder` |",
    "| 3.15 `from_pretrained(EXPORT, trust_remote_code=True, output_loading_info=True)` | returns the model and an "
    "empty report | `tests/test_export.py::test_output_loading_info_returns_the_model_and_an_empty_report` |",
    "| 3.16 a Gemma 3 export with pairs under transformers `tp_plan=\"auto\"` | the first forward raises one "
    "`ValueError`: its pairs' branches stay apart until their post-norms, which tensor parallelism cannot shard "
    "(load it without tp_plan) | `tests/test_gemma3.py::test_tensor_parallelism_of_sandwich_pairs_is_refused_in_one_line` |",
    "", "Memory (issue 32, section 2): every stage that loads a model whole estimates its peak from config.json before "
    "it loads (`lpconvert/memory.py`) and refuses in one line when it exceeds the memory there is (the cgroup's limit "
    "first); `LPCONVERT_SKIP_MEMORY_CHECK=1` tries anyway. Rows above: the cases named `memory_...`.",
]


ISSUE_34_CASES = ("export_of_an_export", "export_of_gemma3_pairs")  # in tests/cases_exports.py


def _issue(name: str, number: int | None) -> str:
    """Issue 7 (first bad-input sweep) numbered its cases; issue 15 added the rest, except those that came
    from the commands' own tests ("-"), those added with a later stage (ADDED_WITH) and issue 23's."""
    if number is not None:
        return f"7, case {number}"
    if name.startswith(ISSUE_34_CASES):
        return "34"
    if CASES[name].__module__.startswith("cases_"):  # issue 32's modules (tests/cases_*.py)
        return "32"
    if name in FROM_COMMAND_TESTS:
        return "-"
    later = [issue for issue, starts in LATER_ISSUES.items() if name.startswith(starts)]
    if later:
        return later[-1]
    names = list(CASES)
    if names.index(name) >= names.index(FIRST_OF_ISSUE_23):
        return "23"
    return next((issue for issue, starts in ADDED_WITH.items() if name.startswith(starts)), "15")


def _sort_key(row: str) -> tuple[int, int]:
    issue = row.split("|")[1].strip()
    if issue.startswith("7"):
        return (7, int(issue.split()[-1]))
    return (int(issue), 0) if issue.isdigit() else (99, 0)


def _row(number, name: str, args: list[str], result, work: Path, root: Path) -> str:
    message = " ".join(result.stderr.split()).replace(str(work) + "/", "").replace(str(root) + "/", "")
    command = " ".join(str(a).replace(str(work) + "/", "").replace(str(root) + "/tiny/", "") for a in args)
    return (f"| {_issue(name, number)} | {name.replace('_', ' ')} | `lpconvert {command}` | {result.exit_code} | "
            f"{message.replace('|', '/')} |")


def main() -> None:
    unknown = (set(ISSUE_CASE) | FROM_COMMAND_TESTS) - set(CASES)
    assert not unknown, f"not cases of tests/test_errors.py (renamed?): {sorted(unknown)}"
    root = Path(tempfile.mkdtemp())
    models = save_tiny_models(root / "tiny")  # as conftest's tiny_models fixture builds them
    rows = []
    for name, case in sorted(CASES.items(), key=lambda item: ISSUE_CASE.get(item[0], 99)):
        work = root / name
        work.mkdir()
        args, _, *expect = case(models, work)
        result = CliRunner().invoke(app, args, env=expect[0].env if expect else {})
        rows.append(_row(ISSUE_CASE.get(name), name, args, result, work, root))
    for name, (number, exc, _, _) in FAULTS.items():  # faults injected into the shard writer, as the tests do
        work = root / name
        work.mkdir()
        args = fault_export(models, work)
        with mock.patch.object(checkpoint, "_write_all", raising_writer(exc)):
            result = CliRunner().invoke(app, args)
        rows.append(_row(number, f"{name} (injected while writing)", args, result, work, root))
    if not torch.cuda.is_available():
        work = root / "cuda"
        work.mkdir()
        args, _ = cuda_without_gpu(models, work)
        rows.append(_row(18, "cuda without a GPU", args, CliRunner().invoke(app, args), work, root))
    rows.sort(key=_sort_key)  # issue 7's cases by number, then by issue, then the rest (stable within an issue)
    text = ["# Errors: what lpconvert says on bad input", "",
            "Every case exits with code 2 (an interrupt: 130; a quality gate that fails: 1), prints one line on stderr",
            "naming the problem and the fix (in parentheses), shows no traceback (`--debug` does) and leaves nothing at the",
            "output path; where a case has a victim (another model's folder, a user's file, a device node) every byte,",
            "name and kind of file is checked unchanged. In a CI log (stderr not a terminal) the progress lines of the",
            "steps that ran come before it; the error is the last line.",
            "Generated by `python scripts/results/errors_table.py` from the cases of `tests/test_errors.py`, which",
            "asserts all of this; paths are shown relative to the test's folder. The issue column names the bad-input",
            "sweep or the stage (13: task accuracy, 14: GGUF, 16: heal, 23 and 32: the reliability rounds) that added the case;",
            "`-` marks a case that came from a command's own tests.", "",
            "| issue | case | command | exit | message |", "|---|---|---|---|---|", *rows, "",
            "The disk-full and interrupt rows raise the fault inside the shard writer, as `tests/test_errors.py`",
            "does; real SIGINT/SIGTERM sent to an exporting process are tested in `tests/test_export.py`. Zero pairs (case 11) is not an error: `export --pairs none` writes an exact",
            "copy in lpconvert's format and warns (`tests/test_cli.py`). A gate fails (exit 1) on a broken bound and on",
            "any figure that is not a finite number, bound or not.", "",
            *BEYOND_THE_TABLE]
    (ROOT / "docs" / "errors.md").write_text("\n".join(text) + "\n")
    print(f"wrote docs/errors.md with {len(rows)} cases")


if __name__ == "__main__":
    main()
