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
