"""`normbench analyze` (stub: the analysis issue fills this in)."""
from __future__ import annotations

from normbench.cli import app, fail  # noqa: F401
