"""The ``normbench`` executable: the command group with every command registered."""
from __future__ import annotations

import sys

from normbench.cli import analyze, data, report, sweep, train  # noqa: F401  (each registers its commands)
from normbench.cli.app import app


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
