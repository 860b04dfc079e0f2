"""Issue 32's bad-input cases (gates): case_* functions, collected by tests/test_errors.py into its one table."""

from __future__ import annotations

from test_errors import Expect, _copy  # noqa: F401  (test_errors imports this module at its end)
