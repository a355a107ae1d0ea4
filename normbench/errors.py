"""The one exception type for user mistakes.

Everything a user can get wrong (a config key, a value, a missing file, a layer that cannot
take the chosen normalization) raises :class:`UserError`. The CLI prints its message as a
single line and exits with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input; ``str(err)`` is the one line the CLI prints."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
