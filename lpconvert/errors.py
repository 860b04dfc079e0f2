"""One error type for everything a user can get wrong.

Stages raise `LPError(problem, fix)`; the CLI prints it as one line and exits with code 2.
Nothing else in lpconvert decides how an error looks.
"""

from __future__ import annotations


class LPError(Exception):
    """A problem with the user's input, with the fix they should apply."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def one_line(self) -> str:
        return f"{self.problem} ({self.fix})" if self.fix else self.problem


def run_script(main) -> None:
    """Run a script's main(): an LPError (a bad --plot path, say) as one line and its exit code, as the CLI does."""
    import sys

    try:
        main()
    except LPError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
