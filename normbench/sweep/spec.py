"""The sweep file: read it, expand its grid, apply its rules, name and validate every cell.

A sweep file::

    description: BN vs GN vs no norm + AGC at two batch sizes
    base: ../base.yaml                # a run config (path relative to this file); optional
    out_dir: runs/sweeps/quick        # every cell's run dir goes here (relative to the cwd)
    name: "{norm.kind}-b{train.batch_size}-s{seed}"   # optional run-name template
    set:                              # fixed overrides for every cell (dotted or nested keys)
      data.train_subset: 5000
      train.epochs: 3
    grid:                             # axes: dotted key -> list of values (cartesian product)
      norm.kind: [bn, gn, none]
      train.batch_size: [8, 32]
      seed: [0, 1]
      "optim.lr,optim.warmup_epochs": [[0.1, 1], [0.05, 2]]   # zipped axis: keys move together
    rules:                            # in order; `where` is matched against the cell so far
      - where: {norm.kind: none}      # a value or a list of allowed values per key
        set: {clip.mode: agc}

Each cell is base <- set <- grid values <- rules <- CLI ``--set``, validated once as a normal
:class:`~normbench.config.RunConfig` whose run dir (``<name>-<config hash>``) lies under the
sweep's output folder. Every cell is validated (and its model built and run forward once)
before the first one starts: one bad cell refuses the whole sweep with one line.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from normbench.config import RunConfig, deep_merge, load_config_dict, read_yaml, validate_config
from normbench.errors import UserError, did_you_mean, first_line
from normbench.sweep.keys import check_key, flatten, freeze, lookup, nest

SWEEP_KEYS = ("description", "base", "out_dir", "name", "set", "grid", "rules")
RULE_KEYS = ("where", "set")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.+=-]")
# Keys the default run name always shows; other grid axes are appended as <last part><value>.
_NAMED_KEYS = ("norm.kind", "clip.mode", "train.batch_size", "seed")


@dataclass
class Rule:
    """Set ``updates`` in every cell whose values match ``where`` (value or list of values)."""

    where: dict[str, Any]
    updates: dict[str, Any]

    def matches(self, raw: dict) -> bool:
        for key, wanted in self.where.items():
            value = lookup(raw, key)
            if isinstance(wanted, list):
                if value not in wanted:
                    return False
            elif value != wanted:
                return False
        return True


@dataclass
class Cell:
    """One point of the grid: its axis values and its validated run config."""

    index: int
    name: str
    values: dict[str, Any]
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()


@dataclass
class Sweep:
    """A parsed, expanded and validated sweep."""

    path: Path
    out_dir: Path
    axes: dict[str, list]
    cells: list[Cell]
    description: str = ""


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of dotted keys to values, got {type(value).__name__}")
    return value


def parse_axes(grid: Any, where: str) -> dict[tuple[str, ...], list]:
    """grid mapping -> {(key, ...): [value or tuple of values, ...]}; zipped axes use 'a,b'."""
    grid = _mapping(grid, f"{where} grid")
    if not grid:
        raise UserError(f"{where}: the grid is empty; give at least one axis, e.g. grid: {{norm.kind: [bn, gn]}}")
    axes: dict[tuple[str, ...], list] = {}
    seen: set[str] = set()
    for key, values in grid.items():
        keys = tuple(k.strip() for k in str(key).split(","))
        for k in keys:
            check_key(k, f"{where} grid")
            if k in seen:
                raise UserError(f"{where} grid: key '{k}' appears in more than one axis")
            seen.add(k)
        if not isinstance(values, list):
            raise UserError(f"{where} grid.{key}: expected a list of values, got {values!r}")
        if not values:
            raise UserError(f"{where} grid.{key}: the list of values is empty, so the grid is empty")
        if len(keys) > 1:
            for v in values:
                if not isinstance(v, list) or len(v) != len(keys):
                    raise UserError(f"{where} grid.{key}: each value of a zipped axis must be a list of "
                                    f"{len(keys)} values (one per key), got {v!r}")
            values = [tuple(v) for v in values]
        if len(set(map(freeze, values))) != len(values):
            raise UserError(f"{where} grid.{key}: a value is listed twice")
        axes[keys] = values
    return axes


def expand_grid(axes: dict[tuple[str, ...], list]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, in file order with the last axis changing fastest."""
    cells = []
    for combo in itertools.product(*axes.values()):
        values: dict[str, Any] = {}
        for keys, value in zip(axes, combo):
            if len(keys) == 1:
                values[keys[0]] = value
            else:
                values.update(zip(keys, value))
        cells.append(values)
    return cells


def parse_rules(rules: Any, where: str) -> list[Rule]:
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise UserError(f"{where} rules: expected a list of {{where: ..., set: ...}}, got {type(rules).__name__}")
    out = []
    for i, rule in enumerate(rules):
        at = f"{where} rules[{i}]"
        if not isinstance(rule, dict):
            raise UserError(f"{at}: expected a mapping with 'where' and 'set', got {rule!r}")
        for key in rule:
            if key not in RULE_KEYS:
                raise UserError(f"{at}: unknown key '{key}'{did_you_mean(key, RULE_KEYS)}; allowed: where, set")
        cond = flatten(_mapping(rule.get("where"), f"{at}.where"))
        updates = flatten(_mapping(rule.get("set"), f"{at}.set"))
        if not updates:
            raise UserError(f"{at}: 'set' is empty; a rule must set at least one key")
        for key in cond:
            check_key(key, f"{at}.where")
        for key in updates:
            check_key(key, f"{at}.set")
        out.append(Rule(cond, updates))
    return out


def _sanitize(text: str) -> str:
    return _NAME_BAD.sub("_", text)


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_name(raw: dict, axis_keys: list[str]) -> str:
    """'<norm>[+<clip>]-b<batch>[-<key><value>...]-s<seed>' from the resolved cell."""
    clip = lookup(raw, "clip.mode")
    name = str(lookup(raw, "norm.kind")) + (f"+{clip}" if clip not in (None, "none") else "")
    name += f"-b{lookup(raw, 'train.batch_size')}"
    for key in axis_keys:
        if key not in _NAMED_KEYS:
            name += f"-{key.split('.')[-1]}{_label(lookup(raw, key))}"
    name += f"-s{lookup(raw, 'seed')}"
    return _sanitize(name)


def render_name(template: str, raw: dict, where: str) -> str:
    def sub(match: re.Match) -> str:
        check_key(match.group(1), f"{where} name")
        return _label(lookup(raw, match.group(1)))

    return _sanitize(_PLACEHOLDER.sub(sub, template))


def load_sweep(path: Path, out_dir: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None,
               preflight: bool = True) -> Sweep:
    """Read, expand and validate a sweep file. Every problem is one UserError line.

    ``overrides`` ({dotted key: value}, from the CLI's ``--set``) apply to every cell, last;
    ``preflight`` also builds each distinct model and runs it forward once at its batch size.
    """
    path = Path(path)
    where = f"sweep {path.name}"
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise UserError(f"{where}: unknown key '{key}'{did_you_mean(str(key), SWEEP_KEYS)}; "
                            f"allowed: {', '.join(SWEEP_KEYS)}")
    base_raw: dict = {}
    if spec.get("base") is not None:
        if not isinstance(spec["base"], str):
            raise UserError(f"{where} base: got {spec['base']!r}; allowed: a path to a run config")
        base_raw = load_config_dict(path.parent / spec["base"])
    fixed = flatten(_mapping(spec.get("set"), f"{where} set"))
    for key in fixed:
        check_key(key, f"{where} set")
    axes = parse_axes(spec.get("grid"), where)
    rules = parse_rules(spec.get("rules"), where)
    overrides = dict(overrides or {})
    axis_keys = [k for keys in axes for k in keys]
    for key in overrides:
        check_key(key, "--set")
        if key in axis_keys:
            raise UserError(f"--set {key}: '{key}' is a grid axis of {path.name}; edit the sweep file instead")
    template = spec.get("name")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{where} name: expected a template string like '{{norm.kind}}-b{{train.batch_size}}'")
    out = out_dir if out_dir is not None else spec.get("out_dir") or f"runs/sweeps/{path.stem}"
    if not isinstance(out, (str, Path)):
        raise UserError(f"{where} out_dir: expected a folder path, got {out!r}")
    out_path = Path(out).expanduser().resolve()
    from normbench.tracking import check_folder_creatable

    check_folder_creatable(out_path, "--out" if out_dir is not None else f"{where} out_dir")

    base_raw = deep_merge(base_raw, nest(fixed))
    cells: list[Cell] = []
    by_dir: dict[str, str] = {}
    for index, values in enumerate(expand_grid(axes)):
        raw = deep_merge(base_raw, nest(values))
        for rule in rules:
            if rule.matches(raw):
                raw = deep_merge(raw, nest(rule.updates))
        raw = deep_merge(raw, nest(overrides))
        name = render_name(template, raw, where) if template else default_name(raw, axis_keys)
        raw["name"] = name
        raw.setdefault("log", {})
        if isinstance(raw["log"], dict):
            raw["log"]["out_dir"] = str(out_path)
        shown = ", ".join(f"{k}={_label(v)}" for k, v in values.items())
        cfg = validate_config(raw, source=f"{where} cell {index} '{name}' ({shown})")
        key = cfg.config_hash()
        if key in by_dir:
            raise UserError(f"{where}: cells '{by_dir[key]}' and '{name}' resolve to the same config "
                            f"(hash {key}); a rule or 'set' overrides a grid axis")
        by_dir[key] = name
        cells.append(Cell(index, name, values, cfg))
    sweep = Sweep(path, out_path, {",".join(k): v for k, v in axes.items()}, cells,
                  str(spec.get("description") or ""))
    if preflight:
        preflight_cells(sweep.cells)
    return sweep


def preflight_cells(cells: list[Cell]) -> None:
    """Build every distinct model once and run it forward (at the cell's batch size for
    batch-dependent norms): layer-level mistakes surface before any cell trains."""
    import torch

    from normbench.models import build_model
    from normbench.norms import get_scheme

    done: set[str] = set()
    for cell in cells:
        cfg = cell.cfg
        scheme = get_scheme(cfg.norm.kind)
        batch = cfg.train.batch_size if scheme.batch_dependent else min(2, cfg.train.batch_size)
        key = freeze([cfg.model.model_dump(), cfg.norm.model_dump(), batch])
        if key in done:
            continue
        done.add(key)
        where = f"sweep cell {cell.index} '{cell.name}'"
        try:
            torch.manual_seed(0)
            model = build_model(cfg).train()
            with torch.no_grad():
                model(torch.zeros(batch, 3, 32, 32))
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{where}: the model fails a forward pass at batch {batch}: {first_line(err)}") from None


def check_devices(cells: list[Cell]) -> None:
    """Every device the cells name exists on this machine (``device: cuda`` without CUDA, or
    ``cuda:3`` on a two-GPU machine, is one line before any cell starts)."""
    from normbench.device import resolve_device

    seen: set[str] = set()
    for cell in cells:
        if cell.cfg.device in seen:
            continue
        seen.add(cell.cfg.device)
        try:
            resolve_device(cell.cfg.device)
        except UserError as err:
            raise UserError(f"sweep cell {cell.index} '{cell.name}': {err}") from None
