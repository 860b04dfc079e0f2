"""Output paths never cost the user data: overlaps with the source are refused before anything is
written or removed, --overwrite removes only what lpconvert wrote, folders honour the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from builders import QUICK_RECIPE, cli_export, invoke, write_scores

from lpconvert.errors import LPError
from lpconvert.outputs import check_output_folder, written_by_lpconvert


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (symlinks not followed) -> sha256 of its bytes."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@pytest.fixture
def workspace(tiny_models, tmp_path):
    """tmp/models/tiny (a copy of the tiny Llama) and a link tmp/link -> tmp/models."""
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_models["llama"], model)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    return tmp_path, model


# Each case: (workspace root, model folder) -> output path that overlaps the source, and the words.
OVERLAPS = {
    "the folder holding the model": (lambda root, model: model.parent, "contains the source model"),
    "the model itself": (lambda root, model: model, "is the source model"),
    "a folder inside the model": (lambda root, model: model / "lp", "lies inside the source model"),
    "the holder through a symlink": (lambda root, model: root / "link", "contains the source model"),
    "the model through a symlink": (lambda root, model: root / "link" / "tiny", "is the source model"),
}


@pytest.mark.parametrize("command", ["export", "convert"])
@pytest.mark.parametrize("case", list(OVERLAPS))
def test_output_overlapping_the_source_is_refused_and_the_source_untouched(case, command, workspace):
    root, model = workspace
    out_of, words = OVERLAPS[case]
    out = out_of(root, model)
    before = tree_digest(root / "models")
    args = ["--pairs", "2"] if command == "export" else ["--recipe", _recipe(root)]
    result = invoke(command, model, "-o", out, "--overwrite", *args)
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_digest(root / "models") == before
    assert not [p for p in root.rglob("*") if "lpconvert-tmp" in p.name or "lpconvert-old" in p.name]


def _recipe(root: Path) -> Path:
    path = root / "recipe.yaml"
    path.write_text(QUICK_RECIPE)
    return path


def test_overwrite_removes_only_what_lpconvert_wrote(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke("export", tiny_models["llama"], "--pairs", "2", "-o", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "not written by lpconvert" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    shutil.rmtree(out)
    cli_export(tiny_models["llama"], out)
    assert written_by_lpconvert(out)
    again = invoke("export", tiny_models["llama"], "--pairs", "1", "-o", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not list(tmp_path.glob(".out.lpconvert-*"))


def test_check_runs_again_just_before_replacing(tiny_models, tmp_path):
    """A folder that stopped being an lpconvert export while we wrote is not removed."""
    out = tmp_path / "out"
    cli_export(tiny_models["llama"], out)
    (out / "config.json").write_text("{}")  # someone reused the folder
    with pytest.raises(LPError, match="not written by lpconvert"):
        check_output_folder(out, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_mode_follows_the_umask(umask, tiny_models, tmp_path):
    previous = os.umask(umask)
    try:
        result = invoke("export", tiny_models["llama"], "--pairs", "2", "-o", tmp_path / "out")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_score_output_file_of_the_source_is_refused(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    before = tree_digest(model)
    result = invoke("score", model, "-o", model / "config.json")
    assert result.exit_code == 2 and "is a file of the source model" in result.stderr
    assert tree_digest(model) == before


def test_overwrite_keeps_an_export_folder_that_holds_other_things(tiny_models, tmp_path):
    """A cloned model repo (.git), notes or a subfolder beside an export are not lpconvert's to remove."""
    out = tmp_path / "out"
    cli_export(tiny_models["llama"], out, "--pairs", "2")
    for extra in (".git", "notes.txt"):
        (out / extra).mkdir() if extra == ".git" else (out / extra).write_text("mine")
        before = tree_digest(out)
        result = invoke("export", tiny_models["llama"], "--pairs", "1", "-o", out, "--overwrite")
        assert result.exit_code == 2 and f"holds {extra}" in result.stderr, result.output
        assert tree_digest(out) == before and (out / extra).exists()
        shutil.rmtree(out / extra) if extra == ".git" else (out / extra).unlink()


def test_overwrite_survives_a_stale_folder_of_an_interrupted_run(tiny_models, tmp_path):
    out = tmp_path / "out"
    cli_export(tiny_models["llama"], out, "--pairs", "2")
    (tmp_path / ".out.lpconvert-old").mkdir()  # what an older lpconvert killed mid-swap left behind
    (tmp_path / ".out.lpconvert-old" / "x").write_text("stale")
    result = invoke("export", tiny_models["llama"], "--pairs", "1", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.lpconvert-old-")]


def test_a_failed_swap_puts_the_old_folder_back(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cli_export(tiny_models["llama"], out, "--pairs", "2")
    before = tree_digest(out)
    real_rename = Path.rename

    def rename(self, target):
        if ".lpconvert-tmp-" in self.name:  # the new folder's move into place fails
            raise OSError(16, "Device or resource busy", str(target))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    result = invoke("export", tiny_models["llama"], "--pairs", "1", "-o", out, "--overwrite")
    assert result.exit_code == 2 and "Device or resource busy" in result.stderr, result.output
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_never_replace_what_the_command_reads(tiny_models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text. " * 200)
    result = invoke("score", tiny_models["llama"], "--calib", text, "-o", text)
    assert result.exit_code == 2 and "is a file this command reads" in result.stderr
    scores = tmp_path / "scores.json"
    assert invoke("score", tiny_models["llama"], "--calib", "news", "--tokens", "256", "--seq-len", "64",
                  "-o", scores).exit_code == 0
    before = scores.read_bytes()
    result = invoke("plan", scores, "--pairs", "1", "-o", scores)
    assert result.exit_code == 2 and "is a file this command reads" in result.stderr
    assert scores.read_bytes() == before


def test_outputs_are_checked_against_a_resolved_source_too(tiny_models, tmp_path, monkeypatch):
    """A built-in or Hub model has no path as typed: its files are protected once it is resolved."""
    model = tmp_path / "cache" / "model"
    shutil.copytree(tiny_models["llama"], model)
    import lpconvert.sources as sources

    real = sources.resolve_model
    monkeypatch.setattr(sources, "resolve_model", lambda name, **kw: real(str(model), **kw))
    before = tree_digest(model)
    result = invoke("score", "some/hub-model", "--calib", "news", "--tokens", "256", "--seq-len", "64",
                    "-o", model / "config.json")
    assert result.exit_code == 2 and "is inside the model folder" in result.stderr, result.output
    os.link(model / "tokenizer.json", tmp_path / "hard.json")  # a hard link outside any model folder
    result = invoke("score", "some/hub-model", "--calib", "news", "--tokens", "256", "--seq-len", "64",
                    "-o", tmp_path / "hard.json", "--overwrite")
    assert result.exit_code == 2 and "was not written by lpconvert" in result.stderr, result.output
    assert tree_digest(model) == before


@pytest.mark.parametrize("name, problem", [
    ("p.txt", "p.txt: a picture is written as .png, .pdf, .svg"),
    (".png", ".png has no name before .png: a picture is written as NAME.png"),
    ("figs/.svg", ".svg has no name before .svg: a picture is written as NAME.svg"),
])
def test_plot_must_be_a_picture_format(name, problem, tiny_models, tmp_path):
    (tmp_path / "figs").mkdir()
    result = invoke("score", tiny_models["llama"], "-o", tmp_path / "s.json", "--plot", tmp_path / name)
    assert result.exit_code == 2 and problem in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figs"]  # nothing written: not -o, not the picture


@pytest.mark.parametrize("name, magic", [("x.svg", (b"<?xml", b"<svg")), ("x.png", (b"\x89PNG\r\n\x1a\n",)),
                                         ("x.pdf", (b"%PDF-",))])
def test_the_one_picture_writer_writes_the_format_of_the_name(name, magic, tmp_path):
    """save_figure, which every picture goes through (the CLI's --plot and scripts/results/'s): an .svg is SVG
    text, never PNG bytes under another name, and carries lpconvert's marker."""
    from lpconvert.plots import pyplot, save_figure, written_plot

    fig, ax = pyplot().subplots()
    ax.plot([1, 2], [3, 4])
    save_figure(fig, tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic) and written_plot(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize("name", [".png", "figs/.svg", "x.jpg", ""])
def test_the_one_picture_writer_refuses_a_name_without_a_stem_or_format(name, tmp_path):
    from lpconvert.plots import pyplot, save_figure

    (tmp_path / "figs").mkdir()
    fig, _ = pyplot().subplots()
    with pytest.raises(LPError) as refused:
        save_figure(fig, tmp_path / name if name else Path(name))
    assert "\n" not in refused.value.one_line() and "picture" in refused.value.one_line()
    assert [p.name for p in tmp_path.rglob("*")] == ["figs"]


# ----------------------------------------------------------------------------------------------
# Output files (issue 32): pictures in the format of their name, marked as lpconvert's; --overwrite
# replaces lpconvert's own outputs and nothing else; a link at the output is replaced, never written through.


@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("pdf", b"%PDF-"), ("png", b"\x89PNG\r\n\x1a\n")])
def test_plan_plot_is_written_in_the_format_of_its_name(fmt, magic, tiny_models, tmp_path):
    from lpconvert.plots import written_plot

    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    picture = tmp_path / f"front.{fmt}"
    result = invoke("plan", scores, "--pairs", "1", "--strategy", "contiguous", "--json", "--plot", picture)
    assert result.exit_code == 0, result.output
    data = picture.read_bytes()
    assert data.startswith(magic), data[:20]
    if fmt == "svg":
        assert b"<svg" in data[:2000] and b"PNG" not in data[:2000]
    assert written_plot(picture)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.json", picture.name])  # no temporary file left


def test_overwrite_replaces_lpconvert_own_scores_and_plot_only_with_the_flag(tiny_models, tmp_path):
    args = ["score", tiny_models["llama"], "--calib", "news", "--tokens", "256", "--seq-len", "64",
            "-o", tmp_path / "s.json", "--plot", tmp_path / "s.png"]
    assert invoke(*args).exit_code == 0
    first = {name: (tmp_path / name).stat().st_ino for name in ("s.json", "s.png")}
    again = invoke(*args)
    assert again.exit_code == 2 and "s.json already exists (pass --overwrite" in again.stderr, again.output
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert all((tmp_path / name).stat().st_ino != ino for name, ino in first.items())  # new files, renamed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.png"]


def test_overwrite_replaces_lpconvert_own_plan_and_svg(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    args = ["plan", scores, "--pairs", "1", "--strategy", "contiguous", "-o", tmp_path / "plan.json",
            "--plot", tmp_path / "front.svg"]
    assert invoke(*args).exit_code == 0
    assert invoke(*args).exit_code == 2
    replaced = invoke(*[a if a != "1" else "2" for a in args], "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((tmp_path / "plan.json").read_text())["kind"] == "lpconvert-plan"
    assert len(json.loads((tmp_path / "plan.json").read_text())["pairs"]) == 2


def test_outputs_through_a_linked_folder_are_written_in_it(tiny_models, tmp_path):
    """A link above the output (a folder) is followed: only a link AT the output path is refused."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    result = invoke("plan", scores, "--pairs", "1", "--strategy", "contiguous", "-o", tmp_path / "link" / "plan.json",
                    "--plot", tmp_path / "link" / "front.pdf")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["front.pdf", "plan.json"]


def test_a_link_at_the_output_is_replaced_never_written_through(tmp_path):
    """The library's writer: the rename replaces the link itself; the file it pointed at keeps its bytes."""
    from lpconvert.outputs import write_json_atomically

    (tmp_path / "notes.json").write_text("mine")
    (tmp_path / "out.json").symlink_to(tmp_path / "notes.json")
    write_json_atomically(tmp_path / "out.json", {"kind": "lpconvert-scores"})
    assert (tmp_path / "notes.json").read_text() == "mine"
    assert not (tmp_path / "out.json").is_symlink() and "lpconvert-scores" in (tmp_path / "out.json").read_text()


def test_a_foreign_file_that_appears_while_the_command_runs_is_kept(tmp_path):
    """Checked before the work and again just before the rename: a file put there meanwhile survives."""
    from lpconvert.outputs import SCORES_OUTPUT, write_json_atomically

    (tmp_path / "s.json").write_text('{"mine": 1}')
    with pytest.raises(LPError, match="was not written by lpconvert"):
        write_json_atomically(tmp_path / "s.json", {"kind": "lpconvert-scores"}, SCORES_OUTPUT, overwrite=True)
    assert (tmp_path / "s.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_only_pictures_lpconvert_drew_count_as_its_own(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpconvert.plots import written_plot

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    for fmt in ("png", "svg", "pdf"):
        fig.savefig(tmp_path / f"mine.{fmt}", format=fmt)  # matplotlib's, but not lpconvert's
        assert not written_plot(tmp_path / f"mine.{fmt}")
    plt.close(fig)
    (tmp_path / "notes.png").write_text("lpconvert-plot")
    assert not written_plot(tmp_path / "notes.png")


@pytest.mark.parametrize("evidence", ["model.gguf", "adapter_config.json", "consolidated.00.pth", "config.json"])
def test_every_kind_of_model_folder_is_recognised(evidence, tmp_path):
    from lpconvert.outputs import model_folder_of

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / evidence).write_text('{"model_type": "llama"}')
    found = model_folder_of(folder / "out.json")
    assert found is not None and found[0] == folder and evidence in found[1]
    below = model_folder_of(folder / "sub" / "out.json")
    assert (below is None) == (evidence == "model.gguf")  # GGUFs sit side by side: only their own folder counts
    beside_for_a_gguf = model_folder_of(folder / "x.gguf", gguf=False)  # a GGUF output may go beside other GGUFs
    assert (beside_for_a_gguf is None) == (evidence == "model.gguf")


def test_a_config_json_of_another_program_does_not_make_a_model_folder(tmp_path):
    from lpconvert.outputs import model_folder_of

    (tmp_path / "config.json").write_text('{"editor": "vim"}')
    assert model_folder_of(tmp_path / "scores.json") is None


def test_heal_replaces_its_own_picture_with_overwrite_and_keeps_a_users(tiny_models, tmp_path):
    from builders import export_plan

    from lpconvert.plots import written_plot

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(export_plan(tiny_models["llama"], tmp_path, pairs="2")))
    args = ["heal", tiny_models["llama"], "--plan", plan, "-o", tmp_path / "heal.safetensors", "--plot",
            tmp_path / "heal.pdf", "--tokens", "512", "--heldout-tokens", "128", "--seq-len", "64", "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    assert (tmp_path / "heal.pdf").read_bytes().startswith(b"%PDF-") and written_plot(tmp_path / "heal.pdf")
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    (tmp_path / "heal.pdf").write_bytes(b"%PDF-1.4 the user's own document")
    refused = invoke(*args, "--overwrite")
    assert refused.exit_code == 2 and "heal.pdf was not written by lpconvert" in refused.stderr, refused.output
    assert (tmp_path / "heal.pdf").read_bytes() == b"%PDF-1.4 the user's own document"


def test_scores_and_pictures_may_sit_beside_a_gguf(tiny_models, tmp_path):
    """The README's working folder holds the exported GGUF and then the next run's scores: only a weights file
    (a heal file) is refused beside a GGUF, where other tools would read it as that folder's weights."""
    from builders import invoke

    (tmp_path / "smollm2-lp27.gguf").write_bytes(b"GGUF")
    result = invoke("score", tiny_models["llama"], "-o", tmp_path / "scores.json", "--plot", tmp_path / "scores.png",
                    "--tokens", "256", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scores.json").is_file() and (tmp_path / "scores.png").is_file()
