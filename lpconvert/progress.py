"""Progress that a person at a terminal and a CI log can both follow.

Stages report steps through one callback, `Reporter.step(label, done, total)`; how it shows is
chosen once, by `--progress` (or LPCONVERT_PROGRESS):

- `bars` (the default on a terminal): Rich bars redrawn in place, gone when the command ends;
- `lines` (the default when stderr is not a terminal, as in CI): plain lines, each with the time
  since the command started: a line when a step starts, an update at most every 5 s while it
  moves, a "still working" line after 8 s of silence (a heartbeat thread, so a step that reports
  nothing for a while still shows it is alive), and a line with its time when it ends;
- `off`: nothing.

Progress goes to stderr, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from .render import format_bytes

MODES = ("auto", "bars", "lines", "off")
UPDATE_EVERY_S = 5.0
HEARTBEAT_S = 8.0  # checked every second: a CI log never goes 10 s without a line


def resolve_mode(mode: str | None, console) -> str:
    where = "--progress" if mode else "LPCONVERT_PROGRESS"
    mode = mode or os.environ.get("LPCONVERT_PROGRESS") or "auto"
    if mode not in MODES:
        from .errors import LPError

        raise LPError(f"{where} '{mode}' does not exist", f"use one of {', '.join(MODES)}")
    if mode == "auto":
        return "bars" if console.is_terminal else "lines"
    return mode


@dataclass
class _Step:
    label: str
    started: float
    done: float | None = None
    total: float | None = None
    unit: str = ""
    detail: str = ""

    def counts(self) -> str:
        if self.done is None:
            return self.detail
        if self.unit == "bytes":
            text = format_bytes(self.done) + (f" / {format_bytes(self.total)}" if self.total else "")
        else:
            text = f"{self.done:g}" + (f"/{self.total:g}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        return f"{text}, {self.detail}" if self.detail else text


class Reporter:
    """One command's progress; use as a context manager around the command's work."""

    def __init__(self, console, mode: str = "auto", quiet: bool = False):
        self.console = console
        self.mode = "off" if quiet else resolve_mode(mode, console)
        self.started = time.monotonic()
        self.current: _Step | None = None
        self._lock = threading.Lock()
        self._last_line = self.started  # silence is counted from the start, not from the epoch
        self._stop = threading.Event()
        self._bars = None
        self._tasks: dict[str, int] = {}

    # -- lifecycle

    def __enter__(self) -> Reporter:
        if self.mode == "bars":
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                  console=self.console, transient=True)
            self._bars.__enter__()
        elif self.mode == "lines":
            threading.Thread(target=self._heartbeat, name="lpconvert-heartbeat", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if exc_type is None:
            self.end()
        if self._bars is not None:
            self._bars.__exit__(exc_type, exc, tb)

    # -- what stages call

    def step(self, label: str, done: float | None = None, total: float | None = None, *, unit: str = "",
             detail: str = "") -> None:
        """Report the state of step `label`; a new label ends the previous step."""
        if self.mode == "off":
            return
        with self._lock:
            now = time.monotonic()
            if self.current is None or self.current.label != label:
                self._end_locked(now)
                self.current = _Step(label, now, done, total, unit, detail)
                self._show(now, started=True)
                return
            step = self.current
            step.done, step.total, step.unit, step.detail = done, total, unit or step.unit, detail
            self._show(now)

    def note(self, text: str) -> None:
        """One line that is not a step (a stage's memory plan): printed above the bars, or as a timed line."""
        if self.mode == "off":
            return
        with self._lock:
            now = time.monotonic()
            if self.mode == "bars":
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self._print_line(now, text)

    def counter(self, label: str, unit: str = ""):
        """A `progress(done, total)` callback for step `label`."""
        return lambda done, total=None: self.step(label, done, total, unit=unit)

    def end(self) -> None:
        """End the current step (its time is printed in `lines` mode)."""
        if self.mode == "off":
            return
        with self._lock:
            self._end_locked(time.monotonic())

    # -- rendering

    def _elapsed(self, now: float) -> str:
        return f"[{now - self.started:5.0f}s]"

    def _print_line(self, now: float, text: str) -> None:
        self.console.print(f"{self._elapsed(now)} {text}", markup=False, highlight=False, soft_wrap=True)
        self._last_line = now

    def _show(self, now: float, started: bool = False) -> None:
        step = self.current
        if self.mode == "bars":
            fields = {"counts": step.counts()}
            if step.label not in self._tasks:
                self._tasks[step.label] = self._bars.add_task(step.label, total=step.total, **fields)
            self._bars.update(self._tasks[step.label], completed=step.done or 0, total=step.total, **fields)
        elif started:
            counts = step.counts()
            self._print_line(now, f"{step.label}: started" + (f", {counts}" if counts else ""))
        elif now - self._last_line >= UPDATE_EVERY_S:
            self._print_line(now, f"{step.label}: {step.counts() or 'working'}")

    def _end_locked(self, now: float) -> None:
        step, self.current = self.current, None
        if step is None:
            return
        if self.mode == "lines":
            self._print_line(now, f"{step.label}: done in {now - step.started:.1f} s")
        elif self.mode == "bars" and step.label in self._tasks:
            self._bars.remove_task(self._tasks.pop(step.label))

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.monotonic()
                if now - self._last_line < HEARTBEAT_S:
                    continue
                if self.current is None:  # between steps: say so rather than fall silent
                    self._print_line(now, "still working")
                    continue
                counts = self.current.counts()
                self._print_line(now, f"{self.current.label}: still working "
                                      f"({now - self.current.started:.0f} s" + (f", {counts})" if counts else ")"))
