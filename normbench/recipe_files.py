"""The recipes that ship inside the package (``normbench/recipes/``; a clone also reaches them
as ``configs/``): the base recipe, one recipe per method, the example sweeps and the study
protocols, found by name.

* ``base.yaml``: ResNet-20 / CIFAR-10, SGD, cosine; what ``normbench train`` trains when it is
  given no ``--config`` and no ``--method``;
* ``methods/<name>.yaml``: one normalization scheme (and its clipping) on top of the base
  recipe, for ``normbench train --method <name>``;
* ``sweeps/<name>.yaml``: example sweeps, for ``normbench sweep <name>``;
* ``studies/``, ``quickstart.yaml``: run configs the sweeps and the quick start build on.

Relative ``base:`` paths inside the files resolve next to each file, wherever the package is
installed. Sweeps write their runs relative to the current directory (their ``out_dir``),
never into the package. This module reads only file names and comments (no YAML parser, no
pydantic), so the command line can list the names in its ``--help`` at no cost.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from normbench.errors import UserError, did_you_mean

RECIPES = Path(__file__).resolve().parent / "recipes"
BASE_RECIPE = RECIPES / "base.yaml"
METHODS = RECIPES / "methods"
SWEEPS = RECIPES / "sweeps"
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)\.\s+(?=[A-Z])")  # not after "et al." or "e.g."


def _names(folder: Path) -> list[str]:
    """The stems of the YAML files in ``folder``, sorted (empty when it is absent)."""
    try:
        return sorted(p.stem for p in folder.iterdir() if p.suffix == ".yaml" and p.is_file())
    except OSError:
        return []


def method_names() -> list[str]:
    """Every method recipe, by name (``gn`` for ``methods/gn.yaml``)."""
    return _names(METHODS)


def sweep_names() -> list[str]:
    """Every example sweep, by name (``quick`` for ``sweeps/quick.yaml``)."""
    return _names(SWEEPS)


def method_recipe(name: str) -> Path:
    """The file of the method recipe ``name``; an unknown name is one line listing the known ones."""
    names = method_names()
    if name not in names:
        raise UserError(f"--method: unknown method '{name}'{did_you_mean(name, names)}; "
                        f"known: {', '.join(names)}")
    return METHODS / f"{name}.yaml"


def sweep_file(arg: str) -> Path:
    """What ``normbench sweep ARG`` reads: the file ``ARG`` if there is one (a file wins),
    else the example sweep of that name; a directory, or anything else, is one line (listing
    the known names)."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    names = sweep_names()
    stem = arg[:-len(".yaml")] if arg.endswith(".yaml") and "/" not in arg else arg
    if stem in names:
        return SWEEPS / f"{stem}.yaml"
    if path.is_dir():
        raise UserError(f"sweep path {arg} is a directory, not a sweep file; give a sweep's YAML file or the name "
                        f"of an example sweep: {', '.join(names)}")
    raise UserError(f"sweep file not found: {arg}{did_you_mean(stem, names)}; give a path or the name of an "
                    f"example sweep: {', '.join(names)}")


def first_comment(path: Path) -> str:
    """The first sentence of a recipe's leading comment block ('' when it has none)."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            break
        lines.append(text)
    text = " ".join(lines)
    end = _SENTENCE_END.search(text)
    return text if end is None else text[:end.start() + 1]


def grid_size(grid: Any) -> Optional[int]:
    """How many cells a sweep file's ``grid`` expands to (the product of its axes' lengths, a
    zipped axis counting once); None when the grid is not a mapping of lists."""
    if not isinstance(grid, dict) or not grid:
        return None
    count = 1
    for values in grid.values():
        if not isinstance(values, list):
            return None
        count *= len(values)
    return count
