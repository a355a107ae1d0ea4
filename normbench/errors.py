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
