"""`normbench sweep` and `normbench report` (stub: the sweep/report issue fills this in)."""
from __future__ import annotations

from normbench.cli import app, fail  # noqa: F401
