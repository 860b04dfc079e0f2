"""Output paths never cost the user data: overlaps with the source are refused before anything is
written or removed, --overwrite removes only what lpconvert wrote, folders honour the umask."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from builders import QUICK_RECIPE, cli_export, invoke

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
    assert result.exit_code == 2 and "is a file of the source model" in result.stderr, result.output
    assert tree_digest(model) == before


def test_plot_must_be_a_picture_format(tiny_models, tmp_path):
    result = invoke("score", tiny_models["llama"], "-o", tmp_path / "s.json", "--plot", tmp_path / "p.txt")
    assert result.exit_code == 2 and "a picture is written as .png, .pdf, .svg" in result.stderr
    assert not (tmp_path / "s.json").exists()
