"""The lpconvert command line (`lpconvert`, `python -m lpconvert`): app.py holds the app and what the
commands share; importing pipeline.py then quality.py registers the commands in pipeline order."""

from . import pipeline, quality  # noqa: F401  (registers the commands, in this order)
from .app import app, main

__all__ = ["app", "main"]
