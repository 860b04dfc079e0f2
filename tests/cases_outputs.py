"""Issue 32's bad-input cases (outputs): case_* functions, collected by tests/test_errors.py into its one table.

One rule for every output file of every command (score -o/--plot, plan -o/--plot, heal -o/its report/--plot):
never through a link, never a file of the source or one the command reads (by device and inode: hard links
too), never inside a model folder of any kind, never over a file lpconvert did not write. Every victim is
checked byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

from test_errors import Expect, _copy, _heal, _scores_for  # noqa: F401  (test_errors imports this module at its end)


def _victim(t, p) -> Path:
    """Another model's folder (the tiny Llama's files), which no output may touch."""
    return _copy(t, "llama", p).rename(p / "victim")


def _source(t, p) -> Path:
    """The command's own source model: a copy, so that a link to its files can be made beside it."""
    return _copy(t, "llama", p).rename(p / "source")


def _notes(p, name: str = "notes.json", text: str = '{"mine": "the user\'s notes"}') -> Path:
    (p / name).write_text(text)
    return p / name


def _score(t, p, *extra, model=None) -> list[str]:
    return ["score", str(model or t["llama"]), "-o", str(p / "out"), *extra]


def _plan_args(t, p, *extra, model=None) -> list[str]:
    args = ["plan", str(_scores_for(t["llama"], p)), "--pairs", "1", "-o", str(p / "out"), *extra]
    return [*args, "--model", str(model)] if model else args


def _set(args: list[str], option: str, value) -> list[str]:
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = str(value)
    else:
        args += [option, str(value)]
    return args


# --- item 1: outputs written through symbolic links and hard links -----------------------------


def _link_to(p, target: Path, name: str) -> Path:
    (p / name).symlink_to(target)
    return p / name


def case_score_plot_is_a_link_to_another_models_config(t, p):
    victim = _victim(t, p)
    link = _link_to(p, victim / "config.json", "pic.png")
    return _score(t, p, "--plot", link, "--overwrite"), "pic.png is a symbolic link (to", Expect(victims=[victim])


def case_plan_plot_is_a_link_to_another_models_tokenizer(t, p):
    victim = _victim(t, p)
    link = _link_to(p, victim / "tokenizer.json", "front.png")
    return _plan_args(t, p, "--plot", link), "lpconvert never writes through a link", Expect(victims=[victim])


def case_heal_plot_is_a_link_to_another_models_weights(t, p):
    victim = _victim(t, p)
    link = _link_to(p, victim / "model.safetensors", "heal.png")
    args = _set(_heal(t, p, "--plot", str(link), "--overwrite"), "-o", p / "out.safetensors")
    return args, "heal.png is a symbolic link (to", Expect(victims=[victim])


def case_score_output_is_a_link_to_another_models_generation_config(t, p):
    victim = _victim(t, p)
    link = _link_to(p, victim / "generation_config.json", "scores.json")
    args = _set(_score(t, p, "--overwrite"), "-o", link)
    return args, "scores.json is a symbolic link (to", Expect(victims=[victim])


def case_score_plot_is_a_link_to_the_users_notes(t, p):
    notes = _notes(p, "notes.txt", "the user's notes")
    link = _link_to(p, notes, "pic.svg")
    return _score(t, p, "--plot", link, "--overwrite"), "pic.svg is a symbolic link (to", Expect(victims=[notes])


def case_plot_is_a_dangling_link(t, p):
    link = _link_to(p, p / "elsewhere" / "pic.png", "pic.png")
    return _score(t, p, "--plot", link), "pic.png is a symbolic link to", Expect(victims=[link])


def case_score_plot_is_a_hard_link_to_the_source_tokenizer(t, p):
    source = _source(t, p)
    os.link(source / "tokenizer_config.json", p / "hard.png")
    return _score(t, p, "--plot", p / "hard.png", model=source), \
        "hard.png is a hard link to", Expect(victims=[source, p / "hard.png"])


def case_score_output_is_a_hard_link_to_the_source_config_with_overwrite(t, p):
    source = _source(t, p)
    os.link(source / "config.json", p / "hard.json")
    args = _set(_score(t, p, "--overwrite", model=source), "-o", p / "hard.json")
    return args, "a file of the source model, which writing it would change", Expect(victims=[source])


def case_plan_output_is_a_hard_link_to_the_source_weights(t, p):
    source = _source(t, p)
    os.link(source / "model.safetensors", p / "hard.json")
    args = _set(_plan_args(t, p, "--overwrite", model=source), "-o", p / "hard.json")
    return args, "hard.json is a hard link to", Expect(victims=[source])


def case_heal_output_is_a_hard_link_to_the_source_weights(t, p):
    source = _source(t, p)
    os.link(source / "model.safetensors", p / "hard.safetensors")
    args = _set(_heal(t, p, "--overwrite"), "-o", p / "hard.safetensors")
    args[1] = str(source)
    return args, "hard.safetensors is a hard link to", Expect(victims=[source])


def case_plot_is_a_hard_link_to_the_calibration_text(t, p):
    text = _notes(p, "calib.txt", "Some calibration text. " * 200)
    os.link(text, p / "hard.png")
    return _score(t, p, "--calib", text, "--plot", p / "hard.png", "--overwrite"), \
        "is a file this command reads (a hard link to", Expect(victims=[text])


# --- item 2: score -o and plan -o over files lpconvert did not write ---------------------------


def case_score_output_is_another_models_config(t, p):
    victim = _victim(t, p)
    return _set(_score(t, p, "--overwrite"), "-o", victim / "config.json"), \
        "(it holds a model's config.json), where a scores file could be read", Expect(victims=[victim])


def case_plan_output_is_another_models_config(t, p):
    victim = _victim(t, p)
    return _set(_plan_args(t, p, "--overwrite"), "-o", victim / "config.json"), \
        "is inside the model folder", Expect(victims=[victim])


def case_plan_output_new_file_in_another_models_folder(t, p):
    victim = _victim(t, p)
    return _set(_plan_args(t, p), "-o", victim / "plan.json"), \
        "(it holds a model's config.json), where a plan file could be read", Expect(victims=[victim])


def case_score_output_in_a_subfolder_of_another_model(t, p):
    victim = _victim(t, p)
    (victim / "runs").mkdir()
    return _set(_score(t, p), "-o", victim / "runs" / "scores.json"), \
        f"is inside the model folder {victim}", Expect(victims=[victim])


def case_score_output_is_the_users_notes(t, p):
    notes = _notes(p)
    return _set(_score(t, p), "-o", notes), \
        f"scores file {notes} already exists (pass --overwrite or choose another path)", Expect(victims=[notes])


def case_score_overwrite_of_the_users_notes(t, p):
    notes = _notes(p)
    return _set(_score(t, p, "--overwrite"), "-o", notes), \
        "notes.json was not written by lpconvert, so --overwrite will not replace it", Expect(victims=[notes])


def case_plan_overwrite_of_the_users_notes(t, p):
    notes = _notes(p)
    return _set(_plan_args(t, p, "--overwrite"), "-o", notes), \
        "notes.json was not written by lpconvert, so --overwrite will not replace it", Expect(victims=[notes])


def case_score_plot_over_the_users_picture(t, p):
    mine = p / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # a PNG lpconvert did not draw (no lpconvert marker)
    return _score(t, p, "--plot", mine), "mine.png already exists (pass --overwrite or choose another path)", Expect(victims=[mine])


def case_score_plot_overwrite_of_the_users_picture(t, p):
    mine = p / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return _score(t, p, "--plot", mine, "--overwrite"), \
        "mine.png was not written by lpconvert, so --overwrite will not replace it", Expect(victims=[mine])


def case_plan_plot_overwrite_of_the_users_svg(t, p):
    mine = _notes(p, "mine.svg", '<svg xmlns="http://www.w3.org/2000/svg"><desc>lpconvert-plot</desc></svg>')
    return _plan_args(t, p, "--plot", mine, "--overwrite"), \
        "mine.svg was not written by lpconvert, so --overwrite will not replace it", Expect(victims=[mine])


def case_score_output_and_plot_are_one_file(t, p):
    return _score(t, p, "--plot", p / "out"), "-o and --plot name the same file"


# --- item 3: heal files in folders of models the old check did not recognise -------------------


def _heal_into(t, p, folder: Path) -> list[str]:
    return _set(_heal(t, p), "-o", folder / "heal.safetensors")


def case_heal_output_beside_a_gguf(t, p):
    folder = p / "ggufs"
    folder.mkdir()
    (folder / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    return _heal_into(t, p, folder), "(it holds a GGUF model, model-q8_0.gguf)", Expect(victims=[folder])


def case_heal_output_in_a_peft_adapter(t, p):
    folder = p / "adapter"
    folder.mkdir()
    _notes(folder, "adapter_config.json", '{"peft_type": "LORA", "r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(64))
    return _heal_into(t, p, folder), "(it holds a PEFT adapter, adapter_config.json)", Expect(victims=[folder])


def case_heal_output_beside_meta_consolidated_weights(t, p):
    folder = p / "meta"
    folder.mkdir()
    (folder / "consolidated.00.pth").write_bytes(bytes(64))
    _notes(folder, "params.json", '{"dim": 4096}')
    return _heal_into(t, p, folder), "(it holds a Meta checkpoint, consolidated.00.pth)", Expect(victims=[folder])


def case_heal_output_in_a_subfolder_of_a_model(t, p):
    victim = _victim(t, p)
    (victim / "original").mkdir()
    return _heal_into(t, p, victim / "original"), f"is inside the model folder {victim} (it holds", \
        Expect(victims=[victim])


# --- item 6: a picture's format is its name's ---------------------------------------------------


def case_plan_plot_unknown_picture_format(t, p):
    return _plan_args(t, p, "--plot", p / "front.jpg"), \
        "front.jpg: a picture is written as .png, .pdf, .svg (e.g. --plot "


# --- item 20: hints that named the wrong fix ----------------------------------------------------


def case_score_output_is_stdout(t, p):
    return _set(_score(t, p), "-o", "/dev/stdout"), \
        "output /dev/stdout is a stream (a link to /proc/self/fd/1), not a file"


def case_plan_output_is_stdout(t, p):
    return _set(_plan_args(t, p), "-o", "/dev/stdout"), "pass --json to print the plan on stdout"


def case_plot_without_a_name(t, p):
    return _score(t, p, "--plot", p / ".png"), \
        f"--plot {p / '.png'} has no name before .png: a picture is written as NAME.png (name the file, e.g. " \
        f"--plot {p / 'scores.png'})"


def case_plot_empty(t, p):
    return _score(t, p, "--plot", ""), \
        "--plot . names no file: a picture is written as NAME.png, NAME.pdf or NAME.svg (name the file, e.g. " \
        "--plot scores.png)"


def case_score_output_empty(t, p):
    return _set(_score(t, p), "-o", ""), "output . is a folder (give a file path such as scores.json)"


def case_heal_report_path_is_a_folder(t, p):
    (p / "heal.json").mkdir()
    return _heal_into(t, p, p), f"heal report {p / 'heal.json'}, written beside {p / 'heal.safetensors'}, is a " \
        "folder (move that folder away, or give -o another name)"
