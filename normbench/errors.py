"""The one exception type for user mistakes.

Everything a user can get wrong (a config key, a value, a missing file, a layer that cannot
take the chosen normalization) raises :class:`UserError`. The CLI prints its message as a
single line and exits with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


class UserError(Exception):
    """A mistake in the user's input; ``str(err)`` is the one line the CLI prints."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_line(err: BaseException, limit: Optional[int] = 240) -> str:
    """An exception's message as one line: its first non-empty line (after the "Error(s) in
    loading" header of ``load_state_dict``), at most ``limit`` characters (None: all of it); the
    exception's type name when it has no message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


FRESH_REMEDY = "rerun with --fresh to start over"


class RunFolderError(UserError):
    """A run folder that cannot be used as it is: a corrupt checkpoint or summary, or results
    made on other data. ``problem`` says what is wrong, ``remedy`` how to proceed; a caller
    with other flags (the sweep) restates it with :meth:`with_remedy`."""

    def __init__(self, problem: str, remedy: str = FRESH_REMEDY):
        super().__init__(f"{problem}; {remedy}")
        self.problem, self.remedy = problem, remedy

    def with_remedy(self, remedy: str) -> "RunFolderError":
        return type(self)(self.problem, remedy)


class OtherDataError(RunFolderError):
    """The run folder holds a summary or checkpoint made on data other than ``data.root``'s."""
