"""The ``normbench`` executable: the command group with every command registered."""
from __future__ import annotations

import sys

from normbench.cli import analyze, data, evaluate, export, report, sweep, train  # noqa: F401  (each registers its commands)
from normbench.cli import listing  # noqa: F401  (normbench list)
from normbench.cli.app import app


def main() -> None:
    try:
        app(prog_name="normbench")  # also under `python -m normbench`: its usage lines and completion
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
