"""``normbench list``: what normbench can train, in four tables: the normalization schemes
(registry key, display name, paper, default settings), the clipping modes, the method recipes
(``--method``) and the example sweeps (``normbench sweep NAME``). A rich table on a terminal,
plain aligned text in a pipe, or ``--json``."""
from __future__ import annotations

import json
import sys

import typer

from normbench.cli.app import app

# The norm.* keys each scheme reads besides eps (normbench.norms.registry builds its layers from them).
SCHEME_SETTINGS = {
    "bn": ("momentum",), "syncbn": ("momentum",), "ghost_bn": ("ghost_batch_size", "running_stats", "momentum"),
    "brn": ("r_max", "d_max", "renorm_momentum", "brn_warmup_epochs", "brn_r_max_epochs", "brn_d_max_epochs"),
    "gn": ("groups",), "ln": (), "in": (), "ws_gn": ("groups",), "frn": ("learn_eps", "frn_activation"),
    "evonorm_s0": ("groups",), "nf": ("nf_alpha",), "none": (),
}
# What each clip.mode does (normbench.clip), and the clip.* keys it reads.
CLIP_RULES = {
    "none": ("no clipping", ()),
    "norm": ("the global gradient L2 norm to max_norm", ("max_norm",)),
    "value": ("each gradient element to [-max_value, max_value]", ("max_value",)),
    "dynamic": ("the global norm to alpha x the mean norm of the last window steps + beta", ("alpha", "beta", "window")),
    "agc": ("unit-wise (Brock et al. 2021b): each unit's gradient to agc_lambda x its weight norm",
            ("agc_lambda", "agc_eps")),
}


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def schemes() -> list[dict]:
    """Every registered normalization scheme with its defaults."""
    from normbench.config import NormConfig
    from normbench.norms import DEFAULT_GROUPS, available_norms, get_scheme
    from normbench.report.styles import NAMES

    fields = NormConfig.model_fields
    out = []
    for key in available_norms():
        scheme = get_scheme(key)
        defaults = {"eps": scheme.default_eps}
        for name in SCHEME_SETTINGS.get(key, ()):
            value = fields[name].default
            defaults[name] = DEFAULT_GROUPS if name == "groups" and value is None else value
        out.append({"key": key, "name": NAMES.get(key, key),
                    "paper": scheme.paper, "normalizes": scheme.normalizes, "defaults": defaults})
    return out


UNDESCRIBED_CLIP = "see the clip.* settings"  # the rule shown for a mode CLIP_RULES does not describe


def clip_modes() -> list[dict]:
    """Every clip.mode the config schema accepts, with its rule and defaults; a mode missing from
    CLIP_RULES is still listed, with the clip.* keys named after it (``agc_*`` for ``agc``)."""
    from typing import get_args

    from normbench.config import ClipConfig

    fields = ClipConfig.model_fields
    out = []
    for mode in get_args(fields["mode"].annotation):
        rule, keys = CLIP_RULES.get(mode) or (UNDESCRIBED_CLIP, [k for k in fields if k.startswith(f"{mode}_")])
        out.append({"mode": mode, "clips": rule, "defaults": {name: fields[name].default for name in keys}})
    return out


def methods() -> list[dict]:
    """Every method recipe: what it trains and the first sentence of its comment."""
    from normbench.cli.describe import recipe_settings
    from normbench.config import load_config_dict, read_yaml
    from normbench.recipe_files import METHODS, first_comment, method_names
    from normbench.report.styles import method_label

    out = []
    for name in method_names():
        path = METHODS / f"{name}.yaml"
        trains = method_label(load_config_dict(path), recipe_settings(read_yaml(path) or {}))
        out.append({"name": name, "trains": trains, "about": first_comment(path), "file": str(path)})
    return out


def sweeps() -> list[dict]:
    """Every example sweep: its cells and its description."""
    from normbench.config import read_yaml
    from normbench.recipe_files import SWEEPS, grid_size, sweep_names

    out = []
    for name in sweep_names():
        path = SWEEPS / f"{name}.yaml"
        spec = read_yaml(path) or {}
        out.append({"name": name, "cells": grid_size(spec.get("grid")), "out_dir": spec.get("out_dir"),
                    "description": spec.get("description", ""), "file": str(path)})
    return out


def tables() -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, column names, rows) of the four tables."""
    def defaults(d: dict) -> str:
        return ", ".join(f"{k} {_show(v)}" for k, v in d.items())

    return [
        ("normalization schemes (norm.kind)", ["key", "name", "paper", "defaults"],
         [[s["key"], s["name"], s["paper"], defaults(s["defaults"])] for s in schemes()]),
        ("clipping modes (clip.mode)", ["mode", "clips", "defaults"],
         [[c["mode"], c["clips"], defaults(c["defaults"])] for c in clip_modes()]),
        ("method recipes (normbench train --method NAME)", ["name", "trains", "about"],
         [[m["name"], m["trains"], m["about"]] for m in methods()]),
        ("example sweeps (normbench sweep NAME)", ["name", "cells", "description"],
         [[s["name"], "?" if s["cells"] is None else str(s["cells"]), s["description"]] for s in sweeps()]),
    ]


def print_plain(sections) -> None:
    """Each table as its title, then aligned columns (two spaces apart), for pipes and logs."""
    for i, (title, columns, rows) in enumerate(sections):
        widths = [max(len(r[j]) for r in [columns] + rows) for j in range(len(columns) - 1)]
        typer.echo(("\n" if i else "") + title)
        for row in [columns] + rows:
            typer.echo("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip())


def print_rich(sections) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for title, columns, rows in sections:
        table = Table(title=title, title_justify="left", title_style="bold")
        for j, col in enumerate(columns):
            table.add_column(col, style="bold" if j == 0 else None, justify="right" if col == "cells" else "left")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)


@app.command("list", epilog="Example: normbench list --json | python -m json.tool")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object.")) -> None:
    """List the normalization schemes, clipping modes, method recipes and example sweeps."""
    if as_json:
        typer.echo(json.dumps({"schemes": schemes(), "clip_modes": clip_modes(), "methods": methods(),
                               "sweeps": sweeps()}, indent=1))
    elif sys.stdout.isatty():
        print_rich(tables())
    else:
        print_plain(tables())
