"""Progress a CI log can follow: off a terminal, plain timed lines for each step's start, updates,
heartbeat and end, never bars redrawn in place; --json stays clean on stdout."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from builders import QUICK_RECIPE
from rich.console import Console
from typer.testing import CliRunner

import lpconvert.progress as progress
from lpconvert.cli import app
from lpconvert.progress import Reporter

LINE = re.compile(r"^\[\s*\d+s\] \S")


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_lines_mode_is_the_default_off_a_terminal():
    console, _ = plain_console()
    assert Reporter(console).mode == "lines"
    assert Reporter(Console(file=io.StringIO(), force_terminal=True)).mode == "bars"
    assert Reporter(console, "off").mode == "off"


def test_each_step_starts_updates_and_ends_with_its_time(monkeypatch):
    monkeypatch.setattr(progress, "UPDATE_EVERY_S", 0.0)
    console, buffer = plain_console()
    with Reporter(console, "lines") as report:
        report.step("scoring", 0, 4, unit="windows")
        report.step("scoring", 2, 4, unit="windows")
        report.step("writing weights", 5_000_000, 10_000_000, unit="bytes")
    lines = buffer.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].endswith("scoring: started, 0/4 windows (0%)")
    assert lines[1].endswith("scoring: 2/4 windows (50%)")
    assert re.search(r"scoring: done in \d+\.\d s$", lines[2])
    assert lines[3].endswith("writing weights: started, 5.0 MB / 10.0 MB (50%)")
    assert re.search(r"writing weights: done in \d+\.\d s$", lines[4])


def test_updates_are_rate_limited():
    console, buffer = plain_console()
    with Reporter(console, "lines") as report:
        for done in range(100):
            report.step("busy", done, 100)
    assert len(buffer.getvalue().splitlines()) == 2  # started, done: no line per update


def test_a_silent_step_still_shows_it_is_alive(monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.3)
    console, buffer = plain_console()
    with Reporter(console, "lines") as report:
        report.step("loading a big model")
        time.sleep(1.6)
    text = buffer.getvalue()
    assert "loading a big model: still working" in text, text


def test_an_error_ends_without_a_done_line():
    console, buffer = plain_console()
    with pytest.raises(RuntimeError), Reporter(console, "lines") as report:
        report.step("scoring")
        raise RuntimeError("boom")
    assert "done in" not in buffer.getvalue()


def test_convert_in_ci_prints_timed_stage_lines(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LPCONVERT_PROGRESS", "auto")  # CliRunner's stderr is not a terminal: lines
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK_RECIPE)
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "out"),
                                      "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True  # progress never reaches stdout
    lines = result.stderr.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    for stage in ("loading .*", "score: scoring layers and pairs", "plan", "export: 1 pairs",
                  "eval: the converted model against the source"):
        assert any(re.search(stage + ": started", line) for line in lines), (stage, lines)
        assert any(re.search(stage + r": done in \d", line) for line in lines), (stage, lines)
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # nothing redrawn in place
