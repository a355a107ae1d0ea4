"""Sweeps: a grid of run configs from one YAML file, trained by local processes or by Ray.

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

Each cell is base <- set <- grid values <- rules <- CLI ``--set``, validated as a normal
:class:`~normbench.config.RunConfig` whose run dir (``<name>-<config hash>``) lies under the
sweep's output folder. Every cell is validated (and its model built and run forward once)
before the first one starts: one bad cell refuses the whole sweep with one line.

Executors share :func:`run_cell`, which takes a per-cell lock (``fcntl.flock`` on
``<run dir>/.lock``; the kernel drops it when its process dies, so a stale lock from a
killed sweep is simply free again), re-reads the cell's summary and only then trains it with
:func:`normbench.engine.train` (which resumes from a checkpoint and never re-trains a
completed run). A cell held by another sweep process is deferred and waited for at the end:
if that process completes it, it is counted as done; if it dies, this one resumes it.

* :class:`LocalExecutor`: N spawned worker processes, each with its own torch thread count,
  pull cells one at a time; the parent draws one progress view.
* :class:`RayExecutor`: every cell a Ray task declaring ``num_cpus`` (its threads) and
  ``num_gpus``; the output folder must be on a filesystem all nodes share.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pydantic import BaseModel

from normbench.config import RunConfig, deep_merge, load_config_dict, read_yaml, validate_config
from normbench.errors import OtherDataError, RunFolderError, UserError, did_you_mean
from normbench.runlock import LOCK_NAME, RunLock

SWEEP_KEYS = ("description", "base", "out_dir", "name", "set", "grid", "rules")
RULE_KEYS = ("where", "set")
TRAIN_LOG = "train.log"
MANIFEST = "sweep.json"
ATTEMPT_MARK = "=== normbench sweep: training"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.+=-]")
# Keys the default run name always shows; other grid axes are appended as <last part><value>.
_NAMED_KEYS = ("norm.kind", "clip.mode", "train.batch_size", "seed")


# ----------------------------------------------------------------------------- keys


def _field_of(model: type[BaseModel], part: str):
    return model.model_fields.get(part)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def check_key(dotted: str, where: str) -> None:
    """Raise a one-line UserError unless ``dotted`` names a value of :class:`RunConfig`."""
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field_info = _field_of(model, part)
        prefix = ".".join(parts[:i])
        if field_info is None:
            allowed = list(model.model_fields)
            hint = did_you_mean(part, allowed)
            if prefix:
                hint = hint.replace("'", f"'{prefix}.", 1)
            raise UserError(f"{where}: unknown key '{dotted}'{hint}; allowed"
                            f"{' in ' + prefix if prefix else ''}: {', '.join(allowed)}")
        if i < len(parts) - 1:
            if not _is_section(field_info.annotation):
                raise UserError(f"{where}: '{'.'.join(parts[:i + 1])}' is a value, not a section (in key '{dotted}')")
            model = field_info.annotation
    if _is_section(field_info.annotation):
        raise UserError(f"{where}: '{dotted}' is a section; name one of its keys: "
                        f"{', '.join(dotted + '.' + k for k in field_info.annotation.model_fields)}")


def _default_of(dotted: str) -> Any:
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[parts[-1]].get_default(call_default_factory=True)


def lookup(raw: dict, dotted: str) -> Any:
    """The value of ``dotted`` in a raw (unvalidated) config, falling back to its default."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _default_of(dotted)
        node = node[part]
    return node


def nest(flat: dict[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} (values that are mappings merge key by key)."""
    out: dict = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        tree: dict = value
        for part in reversed(parts):
            tree = {part: tree}
        out = deep_merge(out, tree)
    return out


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted mapping -> {dotted key: value}; sections recurse, values stop."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and _points_to_section(dotted):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _points_to_section(dotted: str) -> bool:
    model: Any = RunConfig
    for part in dotted.split("."):
        if not _is_section(model):
            return False
        field_info = model.model_fields.get(part)
        if field_info is None:
            return False
        model = field_info.annotation
    return _is_section(model)


# ----------------------------------------------------------------------------- the sweep file


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
        if len(set(map(_freeze, values))) != len(values):
            raise UserError(f"{where} grid.{key}: a value is listed twice")
        axes[keys] = values
    return axes


def _freeze(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


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
        key = _freeze([cfg.model.model_dump(), cfg.norm.model_dump(), batch])
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
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{where}: the model fails a forward pass at batch {batch}: {first}") from None


# ----------------------------------------------------------------------------- cell state and locks


CellLock = RunLock  # the sweep's name for the per-run lock (normbench.runlock)

# What a sweep user does about a cell whose folder cannot be used as it is (the run folder's
# own messages name `normbench train`'s --fresh).
RETRAIN_REMEDY = "run the sweep again with --rerun-failed to retrain the cell from scratch"
OTHER_DATA_REMEDY = ("give the sweep another --out to keep those results, or run it with --force to retrain "
                     "every cell on this data")


def sweep_remedy(err: UserError) -> UserError:
    """``err`` restated with the sweep's flags where it is about a run folder."""
    if isinstance(err, OtherDataError):
        return err.with_remedy(OTHER_DATA_REMEDY)
    if isinstance(err, RunFolderError):
        return err.with_remedy(RETRAIN_REMEDY)
    return err


def _safe_summary(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    from normbench.tracking import read_summary

    try:
        return read_summary(run_dir / "summary.json"), None
    except UserError as err:
        return None, str(sweep_remedy(err))


def other_data(cfg: RunConfig, summary: Optional[dict]) -> Optional[OtherDataError]:
    """The refusal for a cell whose summary was made on other data than its ``data.root``
    holds (the same rule as ``normbench train``); None when it matches, or when the data is
    not there to compare (it is prepared before any cell trains, and the engine checks again)."""
    from normbench.data import present_identity
    from normbench.engine import check_summary_data

    if summary is None:
        return None
    try:
        check_summary_data(cfg.run_dir(), summary, present_identity(cfg.data.resolved_root()), cfg)
    except OtherDataError as err:
        return err.with_remedy(OTHER_DATA_REMEDY)
    return None


def cell_state(cell: Cell) -> str:
    """done | diverged | failed | partial | running (locked by a live process) | new |
    other-data (the folder holds a run on other data than the cell's data.root)."""
    run_dir = cell.run_dir
    summary, problem = _safe_summary(run_dir)
    if CellLock(run_dir / LOCK_NAME).is_held():
        return "running"
    if problem is not None:
        return "failed"
    if summary is not None:
        if other_data(cell.cfg, summary) is not None:
            return "other-data"
        status = summary.get("status")
        if status == "completed":
            return "done"
        if status in ("diverged", "failed"):
            return status
        return "partial"
    if (run_dir / "checkpoint.pt").exists():
        return "partial"
    return "new"


def log_path(run_dir: Path) -> Path:
    """The most useful log of a cell: its traceback if it failed, else its training log."""
    err = run_dir / "error.log"
    return err if err.exists() else run_dir / TRAIN_LOG


# ----------------------------------------------------------------------------- running one cell


def _result(task: dict, outcome: str, summary: Optional[dict] = None, **extra) -> dict:
    summary = summary or {}
    run_dir = Path(task["run_dir"])
    return {"index": task["index"], "name": task["name"], "run_dir": str(run_dir), "outcome": outcome,
            "status": summary.get("status"), "final_test_acc": summary.get("final_test_acc"),
            "steps": summary.get("steps"), "total_steps": summary.get("total_steps"),
            "diverged_step": summary.get("diverged_step"), "wall_time_s": summary.get("wall_time_s"),
            "note": summary.get("note"), "log": str(log_path(run_dir)), "pid": os.getpid(),
            "host": socket.gethostname(), **extra}


@contextmanager
def redirect_output(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` (append)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _cell_progress(notify: Optional[Callable[..., None]], index: int):
    from normbench.progress import PlainProgress

    class CellProgress(PlainProgress):
        """Plain lines into the cell's train.log, and step counts to the sweep's parent."""

        def __init__(self):
            super().__init__(every_s=30.0, stream=sys.stdout)
            self._sent = 0.0

        def start(self, run_name, total_steps, done_steps, steps_per_epoch):
            super().start(run_name, total_steps, done_steps, steps_per_epoch)
            if notify:
                notify("start", index, total_steps, done_steps)

        def update(self, step, metrics):
            super().update(step, metrics)
            now = time.monotonic()
            if notify and now - self._sent > 0.5:
                self._sent = now
                notify("step", index, step)

    return CellProgress()


def run_cell(task: dict, notify: Optional[Callable[..., None]] = None,
             should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Lock, re-check and train one cell (or a pack of cells); never raises for a failing run.

    ``task``: index, name, run_dir, config (a RunConfig dict), mode (normal | rerun | force),
    wait (block on a held lock), since (sweep start time: with ``force``, a summary newer than
    this was written by a concurrent sweep and is kept). Returns a small result dict whose
    ``outcome`` is trained | skipped | locked."""
    from normbench.tracking import RunDir

    if "pack" in task:
        return run_pack(task, notify)
    cfg = RunConfig.model_validate(task["config"])
    run_dir = RunDir(cfg.run_dir())
    run_dir.create()
    lock = CellLock(run_dir.path / LOCK_NAME)
    if not lock.acquire(task.get("wait", False), should_stop):
        return _result(task, "locked", holder=lock.holder())
    try:
        existing, problem = _safe_summary(run_dir.path)
        status = existing.get("status") if existing else None
        mode = task.get("mode", "normal")
        refusal = other_data(cfg, existing) if mode != "force" else None
        if refusal is not None:
            return _result(task, "refused", existing, error=str(refusal))
        if status == "completed":
            if mode != "force":
                return _result(task, "skipped", existing)
            if run_dir.summary.stat().st_mtime >= task.get("since", 0):
                return _result(task, "skipped", existing)  # a concurrent --force sweep redid it
        if status in ("failed", "diverged") and mode == "normal" and problem is None:
            return _result(task, "skipped", existing)  # recorded result; --rerun-failed redoes it
        fresh = mode == "force" or (mode == "rerun" and (status in ("failed", "diverged") or problem is not None))
        return _train_cell(task, cfg, run_dir, fresh, notify)
    finally:
        lock.release()


def _train_cell(task: dict, cfg: RunConfig, run_dir, fresh: bool, notify) -> dict:
    log = run_dir.path / TRAIN_LOG
    with redirect_output(log):
        print(f"\n{ATTEMPT_MARK} {task['name']} (pid {os.getpid()} on {socket.gethostname()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {'fresh' if fresh else 'resume if possible'}, "
              f"{cfg.threads} thread(s))", flush=True)
        try:
            from normbench.engine import train

            summary = train(cfg, fresh=fresh, progress=_cell_progress(notify, task["index"]))
        except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
            if isinstance(err, UserError):
                err = sweep_remedy(err)
            if isinstance(err, OtherDataError):  # another run's results: left as they are, nothing recorded
                print(str(err), flush=True)
                return _result(task, "refused", error=str(err))
            text = f"{err}\n" if isinstance(err, UserError) else traceback.format_exc()  # a user error: its one line
            print(text, flush=True)
            summary, _ = _safe_summary(run_dir.path)
            if summary is None or summary.get("status") != "failed" or not run_dir.error_log.exists():
                run_dir.error_log.write_text(text)
                summary = _failed_summary(cfg, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                          run_dir)
                run_dir.write_summary(summary)
            one_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            return _result(task, "trained", summary, error=one_line)
        print(f"=== {summary['status']} after {summary.get('steps')} steps", flush=True)
    return _result(task, "trained", summary)


def run_pack(task: dict, notify: Optional[Callable[..., None]] = None) -> dict:
    """Train the member cells of a pack task as one packed network (normbench.packed).

    Every member is locked first; members held by another process or already recorded are
    left out (a pack of one trains alone). The packed training writes each member's own run
    folder; its output goes to every member's train.log. Returns the lead member's result
    with all members' results under ``members``."""
    from normbench.packed import train_packed
    from normbench.tracking import RunDir

    locks, members, results = [], [], []
    try:
        for member in task["pack"]:
            cfg = RunConfig.model_validate(member["config"])
            run_dir = RunDir(cfg.run_dir())
            run_dir.create()
            lock = CellLock(run_dir.path / LOCK_NAME)
            if not lock.acquire(False):
                results.append(_result(member, "locked", holder=lock.holder()))
                continue
            locks.append(lock)
            existing, problem = _safe_summary(run_dir.path)
            status = existing.get("status") if existing else None
            refusal = other_data(cfg, existing) if member.get("mode") != "force" else None
            if refusal is not None:
                results.append(_result(member, "refused", existing, error=str(refusal)))
                continue
            if status == "completed" or (status in ("failed", "diverged") and member.get("mode") == "normal"):
                results.append(_result(member, "skipped", existing))
                continue
            members.append((member, cfg, run_dir))
        if len(members) == 1:
            member, cfg, run_dir = members[0]
            results.append(_train_cell(member, cfg, run_dir, member.get("mode") == "force", notify))
        elif members:
            fresh = any(m.get("mode") == "force" for m, _, _ in members)
            log = members[0][2].path / TRAIN_LOG
            with redirect_output(log):
                names = ", ".join(m["name"] for m, _, _ in members)
                print(f"\n{ATTEMPT_MARK} packed x{len(members)}: {names} (pid {os.getpid()}, "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})", flush=True)
                try:
                    summaries = train_packed([cfg for _, cfg, _ in members], progress=_cell_progress(
                        notify, members[0][0]["index"]), fresh=fresh)
                except OtherDataError as err:  # a member's checkpoint: leave every folder as it is
                    err = sweep_remedy(err)
                    print(str(err), flush=True)
                    for member, _, _ in members:
                        results.append(_result(member, "refused", error=str(err)))
                    members, summaries = [], []
                except Exception as err:  # noqa: BLE001 - record every member as failed, go on
                    text = traceback.format_exc()
                    why = type(err).__name__
                    if isinstance(err, UserError):
                        why = str(sweep_remedy(err))
                        text = why + "\n"
                    print(text, flush=True)
                    summaries = []
                    for member, cfg, run_dir in members:
                        run_dir.write_error_log(text)
                        run_dir.write_summary(_failed_summary(cfg, f"packed training failed: {why}", run_dir))
                        summaries.append(run_dir.read_summary())
            for (member, cfg, run_dir), summary in zip(members, summaries):
                if run_dir.path / TRAIN_LOG != log:
                    with open(run_dir.path / TRAIN_LOG, "a") as f:
                        f.write(f"\n{ATTEMPT_MARK} packed with {names}: see {log}\n=== {summary.get('status')}\n")
                results.append(_result(member, "trained", summary))
    finally:
        for lock in locks:
            lock.release()
    lead = next((r for r in results if r["index"] == task["index"]), results[0])
    outcome = "trained" if any(r["outcome"] == "trained" for r in results) else lead["outcome"]
    return {**lead, "outcome": outcome, "members": results}


def pack_tasks(tasks: list[dict], pack: int, pack_max_batch: Optional[int] = None) -> list[dict]:
    """Group tasks whose cells differ only in seed into pack tasks of up to ``pack`` cells;
    with ``pack_max_batch``, only cells whose batch size is at most that (packing pays at
    small batches, where one network leaves the cores idle)."""
    from normbench.packed import pack_key, why_not_packable

    if pack <= 1:
        return tasks
    groups: dict[tuple, list[dict]] = {}
    out: list[dict] = []
    for task in tasks:
        cfg = RunConfig.model_validate(task["config"])
        too_large = pack_max_batch is not None and cfg.train.batch_size > pack_max_batch
        if too_large or why_not_packable(cfg) is not None:
            out.append(task)
            continue
        groups.setdefault((pack_key(cfg), task["mode"]), []).append(task)
    for members in groups.values():
        for start in range(0, len(members), pack):
            chunk = members[start:start + pack]
            if len(chunk) == 1:
                out.append(chunk[0])
                continue
            lead = chunk[0]
            out.append({**lead, "name": f"{lead['name']} (+{len(chunk) - 1} packed)",
                        "cost": sum(t["cost"] for t in chunk) / 3, "pack": chunk})
    out.sort(key=lambda t: -t["cost"])
    return out


def _failed_summary(cfg: RunConfig, note: str, run_dir) -> dict:
    return {"status": "failed", "run_name": cfg.run_name, "run_id": cfg.config_hash(), "final_test_acc": None,
            "best_test_acc": None, "steps": 0, "note": note, "error_log": str(run_dir.error_log),
            "config": cfg.to_dict()}


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What a sweep invocation will do: the tasks to run and the cells it leaves alone."""

    sweep: Sweep
    states: dict[int, str]
    tasks: list[dict]
    skipped: list[int]
    threads: int
    since: float = field(default_factory=time.time)


def plan_sweep(sweep: Sweep, threads: int, force: bool = False, rerun_failed: bool = False, pack: int = 1,
               pack_max_batch: Optional[int] = None) -> Plan:
    """Decide, per cell, whether to train it; tasks come out longest first (a cheap proxy)."""
    states = {cell.index: cell_state(cell) for cell in sweep.cells}
    mode = "force" if force else "rerun" if rerun_failed else "normal"
    foreign = [cell for cell in sweep.cells if states[cell.index] == "other-data"]
    if foreign and not force:
        cell = foreign[0]
        more = f" (and {len(foreign) - 1} more cell(s))" if len(foreign) > 1 else ""
        raise UserError(f"sweep cell {cell.index} '{cell.name}'{more}: "
                        f"{other_data(cell.cfg, _safe_summary(cell.run_dir)[0])}")
    runnable = {"normal": {"new", "partial", "running"},
                "rerun": {"new", "partial", "running", "failed", "diverged"},
                "force": {"new", "partial", "running", "failed", "diverged", "done", "other-data"}}[mode]
    since = time.time()
    tasks, skipped = [], []
    for cell in sweep.cells:
        if states[cell.index] not in runnable:
            skipped.append(cell.index)
            continue
        cfg = cell.cfg.model_copy(update={"threads": threads})
        tasks.append({"index": cell.index, "name": cell.name, "run_dir": str(cell.run_dir), "config": cfg.to_dict(),
                      "mode": mode, "wait": False, "since": since, "cost": cost_proxy(cell.cfg)})
    tasks.sort(key=lambda t: -t["cost"])
    return Plan(sweep, states, pack_tasks(tasks, pack, pack_max_batch), skipped, threads, since)


STEP_OVERHEAD_IMAGES = {"cpu": 3, "other": 24}  # a step's fixed cost, in images' worth of compute
EVAL_IMAGES = 10000 / 3  # one evaluation of the test set (forward only) in training images' worth


def cost_proxy(cfg: RunConfig) -> float:
    """Relative cost of a cell without measuring: images seen plus a per-step overhead, plus
    its evaluations. The overhead (in images' worth) is what a ResNet-20 step costs beyond its
    images: ~3 on one CPU thread (measured: batch 2 at ~140 img/s, batch 32 at ~290 img/s per
    single-thread worker on the 2-core machine), far more on a GPU, where small steps are
    almost all launch overhead."""
    n = cfg.data.train_subset or 50000
    steps = (n // cfg.train.batch_size) * cfg.train.epochs
    overhead = STEP_OVERHEAD_IMAGES["cpu" if cfg.device == "cpu" or not cuda_device_count() else "other"]
    evals = max(1, cfg.train.epochs // cfg.train.eval_every)
    return (steps * (cfg.train.batch_size + overhead) + evals * EVAL_IMAGES) * cfg.model.width ** 2


def write_manifest(sweep: Sweep) -> None:
    """``<out_dir>/sweep.json``: the sweep file and every cell's name, axis values and run dir."""
    from normbench.tracking import atomic_write_json

    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.out_dir / MANIFEST, {
        "sweep_file": str(sweep.path.resolve()), "description": sweep.description, "axes": sweep.axes,
        "cells": [{"index": c.index, "name": c.name, "values": c.values, "run_dir": str(c.run_dir)}
                  for c in sweep.cells]})


def ensure_data(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Make each distinct data root ready once, before any worker starts (no N-way decode)."""
    from normbench.data import ensure_cifar10

    seen = set()
    for cell in sweep.cells:
        key = (str(cell.cfg.data.resolved_root()), cell.cfg.data.allow_download)
        if key not in seen:
            seen.add(key)
            ensure_cifar10(cell.cfg.data.resolved_root(), cell.cfg.data.allow_download, log)


def absolute_data_roots(tasks: list[dict]) -> None:
    """Pin each task's data root to an absolute path (not part of the config hash): remote
    workers have another cwd and environment."""
    from normbench.config import DataConfig

    for task in tasks:
        data = task["config"]["data"]
        data["root"] = str(DataConfig(**data).resolved_root().resolve())


# ----------------------------------------------------------------------------- throughput probe


def _data_sizes(cfg: RunConfig, cache: dict) -> tuple[int, int]:
    root = cfg.data.resolved_root()
    if str(root) not in cache:
        sizes = (50000, 10000)
        try:
            from normbench.data import FOLDER, TEST_FILES, TRAIN_FILES, _load_batch

            folder = root / FOLDER
            if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
                sizes = (sum(len(_load_batch(folder / f)[1]) for f in TRAIN_FILES),
                         sum(len(_load_batch(folder / f)[1]) for f in TEST_FILES))
        except Exception:  # noqa: BLE001 - an estimate only
            pass
        cache[str(root)] = sizes
    n_train, n_test = cache[str(root)]
    if cfg.data.train_subset:
        n_train = min(n_train, cfg.data.train_subset)
    return n_train, n_test


def probe_step_time(cfg: RunConfig, threads: int, min_time_s: float = 0.3, max_steps: int = 5) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image) for this cell's model, norm,
    clipping and batch size: a few SGD steps on random data in this process."""
    import torch
    import torch.nn.functional as F

    from normbench.clip import make_clipper
    from normbench.engine import build_optimizer, resolve_device, use_channels_last
    from normbench.models import build_model

    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if use_channels_last(cfg, device) else torch.contiguous_format
    model = build_model(cfg).to(device, memory_format=fmt).train()
    opt = build_optimizer(cfg, model)
    clipper = make_clipper(cfg.clip, model)
    b = cfg.train.batch_size
    x = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (b,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipper()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < max_steps and (n == 0 or time.perf_counter() - t0 < min_time_s):
        step()
        n += 1
    sync()
    per_step = (time.perf_counter() - t0) / n
    eb = min(cfg.train.eval_batch_size, 100)
    xe = torch.randn(eb, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    model.eval()
    with torch.no_grad():
        model(xe)
        sync()
        t0 = time.perf_counter()
        model(xe)
        sync()
    per_eval_image = (time.perf_counter() - t0) / eb
    return per_step, per_eval_image


def estimate(plan: Plan, workers: int, log: Callable[[str], None] = lambda m: None) -> tuple[dict[int, float], float]:
    """Estimated seconds per task (remaining steps only) and the sweep's wall time with
    ``workers`` parallel workers (greedy: next task to the first free worker)."""
    probes: dict[str, tuple[float, float]] = {}
    sizes: dict = {}
    per_task: dict[int, float] = {}
    for task in plan.tasks:
        cfg = RunConfig.model_validate(task["config"])
        key = _freeze([cfg.model.model_dump(), cfg.norm.model_dump(), cfg.clip.model_dump(), cfg.train.batch_size,
                       cfg.train.channels_last, cfg.device])
        if key not in probes:
            log(f"probing {cfg.norm.kind} at batch {cfg.train.batch_size}")
            try:
                probes[key] = probe_step_time(cfg, plan.threads)
            except Exception as err:  # noqa: BLE001 - the run itself will report it properly
                log(f"probe of {task['name']} failed ({type(err).__name__}: {err}); no estimate for it")
                probes[key] = (float("nan"), float("nan"))
        per_step, per_eval_image = probes[key]
        n_train, n_test = _data_sizes(cfg, sizes)
        total = (n_train // cfg.train.batch_size) * cfg.train.epochs
        done = 0
        if task["mode"] != "force" and plan.states.get(task["index"]) == "partial":
            done = _checkpoint_step(Path(task["run_dir"]))
        evals = len([e for e in range(1, cfg.train.epochs + 1)
                     if e % cfg.train.eval_every == 0 or e == cfg.train.epochs])
        frac = (total - done) / total if total else 0.0
        per_task[task["index"]] = (total - done) * per_step + frac * evals * n_test * per_eval_image + 3.0
    finish = [0.0] * max(1, workers)
    for task in plan.tasks:
        if per_task[task["index"]] != per_task[task["index"]]:
            continue  # NaN: no estimate for this cell
        i = min(range(len(finish)), key=finish.__getitem__)
        finish[i] += per_task[task["index"]]
    return per_task, max(finish) if plan.tasks else 0.0


def _checkpoint_step(run_dir: Path) -> int:
    summary, _ = _safe_summary(run_dir)
    if summary and summary.get("steps"):
        return int(summary["steps"])
    try:
        from normbench.tracking import RunDir

        ckpt = RunDir(run_dir).load_checkpoint()
        return int(ckpt["state"]["step"]) if ckpt else 0
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


# ----------------------------------------------------------------------------- display


class SweepDisplay:
    """Callbacks an executor uses to show the sweep's progress; the defaults do nothing."""

    def begin(self, total: int, weights: Optional[dict[int, float]] = None) -> None: ...
    def started(self, index: int, name: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, index: int, step: int) -> None: ...
    def finished(self, result: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self) -> None: ...


def _result_line(result: dict) -> str:
    status = "refused" if result["outcome"] == "refused" else result.get("status") or result["outcome"]
    bits = [f"{result['name']}: {status}"]
    if result["outcome"] == "skipped":
        bits[0] += " (already recorded, not trained)"
    if result.get("final_test_acc") is not None:
        bits.append(f"test acc {result['final_test_acc']:.4f}")
    if status == "diverged" and result.get("diverged_step") is not None:
        bits.append(f"at step {result['diverged_step']}")
    if result.get("error"):
        bits.append(result["error"][:240])
    if result.get("wall_time_s") is not None and result["outcome"] == "trained":
        bits.append(fmt_duration(result["wall_time_s"]))
    if status in ("failed", "diverged"):
        bits.append(f"log {result['log']}")
    return ", ".join(bits)


class _Counts:
    def __init__(self):
        self.total = self.done = self.failed = 0
        self.running: dict[int, list] = {}  # index -> [name, total, step]
        self.weights: dict[int, float] = {}  # index -> estimated cost (cost_proxy); empty: all alike
        self.done_weight = 0.0
        self.start_frac: dict[int, float] = {}  # index -> fraction already done when it (re)started
        self.work_done = 0.0  # estimated cost trained by THIS invocation (resumed parts excluded)
        self.t0 = time.monotonic()

    def _w(self, index: int) -> float:
        return self.weights.get(index, 0.0) if self.weights else 1.0

    def start(self, index: int, name: str, total_steps: int, done_steps: int) -> None:
        self.running[index] = [name, total_steps, done_steps]
        self.start_frac[index] = done_steps / total_steps if total_steps else 0.0

    def finish(self, index: int) -> None:
        self.done += 1
        self.done_weight += self._w(index)
        self.work_done += self._w(index) * (1.0 - self.start_frac.get(index, 0.0))

    def fraction_done(self) -> float:
        """Tasks done, each counted by its estimated cost when known (long cells run first, so
        counting tasks alike would make the ETA far too long early on), in units of tasks."""
        if not self.weights:
            return self.done + sum(step / tot for _, tot, step in self.running.values() if tot)
        part = sum(self.weights.get(i, 0.0) * step / tot for i, (_, tot, step) in self.running.items() if tot)
        return self.total * (self.done_weight + part) / max(sum(self.weights.values()), 1e-9)

    def eta(self) -> Optional[float]:
        """Seconds left: the work still to do at the rate of the work THIS invocation has done
        (a resumed cell's earlier steps count as done, not as speed)."""
        frac = self.fraction_done()
        running_work = sum(self._w(i) * (step / tot - self.start_frac.get(i, 0.0))
                           for i, (_, tot, step) in self.running.items() if tot)
        work_now = self.work_done + running_work
        total_w = sum(self.weights.values()) if self.weights else float(self.total)
        if frac <= 0.05 or work_now <= 0.01 * total_w:
            return None
        remaining = total_w * (1.0 - frac / max(self.total, 1))
        return (time.monotonic() - self.t0) / work_now * remaining


class PlainSweepDisplay(SweepDisplay):
    """One line per event, and a status line at most every ``every_s`` seconds."""

    def __init__(self, stream=None, every_s: float = 30.0):
        self.stream, self.every_s, self.c, self._last = stream or sys.stdout, every_s, _Counts(), time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, total, weights=None):
        self.c.total, self.c.weights = total, dict(weights or {})

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        self._print(f"[start] {name}" + (f" (resuming at step {done_steps}/{total_steps})" if done_steps else ""))

    def step(self, index, step):
        if index in self.c.running:
            self.c.running[index][2] = step
        if time.monotonic() - self._last > self.every_s:
            self._last = time.monotonic()
            self._print(f"[sweep] {self.c.done}/{self.c.total} done, {len(self.c.running)} running, "
                        f"{self.c.failed} failed/diverged, eta {fmt_duration(self.c.eta())}")

    def finished(self, result):
        self.c.running.pop(result["index"], None)
        if result["outcome"] == "locked":
            self._print(f"[wait] {result['name']}: being trained by {result.get('holder')}; will wait for it at the end")
            return
        self.c.finish(result["index"])
        if result.get("status") in ("failed", "diverged"):
            self.c.failed += 1
        self._print(f"[{self.c.done}/{self.c.total}] {_result_line(result)}")

    def message(self, text):
        self._print(text)


class RichSweepDisplay(SweepDisplay):
    """A rich live view: one overall bar (done / running / failed, ETA) and a bar per running cell."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console()
        self.c = _Counts()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.overall = None
        self.tasks: dict[int, Any] = {}

    def _refresh(self):
        info = f"{self.c.done}/{self.c.total} done · {len(self.c.running)} running · {self.c.failed} failed/diverged"
        self.bar.update(self.overall, completed=self.c.fraction_done(), info=info)

    def begin(self, total, weights=None):
        self.c.total, self.c.weights = total, dict(weights or {})
        self.bar.start()
        self.overall = self.bar.add_task("[bold]sweep", total=max(total, 1), info="")
        self._refresh()

    def started(self, index, name, total_steps, done_steps):
        self.c.start(index, name, total_steps, done_steps)
        self.tasks[index] = self.bar.add_task(f"  {name}", total=max(total_steps, 1), completed=done_steps,
                                              info=f"{done_steps}/{total_steps} steps")
        self._refresh()

    def step(self, index, step):
        if index in self.c.running:
            self.c.running[index][2] = step
            self.bar.update(self.tasks[index], completed=step, info=f"{step}/{self.c.running[index][1]} steps")
        self._refresh()

    def finished(self, result):
        self.c.running.pop(result["index"], None)
        if result["index"] in self.tasks:
            self.bar.remove_task(self.tasks.pop(result["index"]))
        if result["outcome"] == "locked":
            self.console.print(f"[yellow]wait[/] {result['name']}: being trained by {result.get('holder')}; "
                               "will wait for it at the end")
        else:
            self.c.finish(result["index"])
            bad = result.get("status") in ("failed", "diverged") or result["outcome"] == "refused"
            self.c.failed += bad
            self.console.print(f"[{'red' if bad else 'green'}]{'✗' if bad else '✓'}[/] {_result_line(result)}",
                               highlight=False)
        self._refresh()

    def message(self, text):
        self.console.print(text, highlight=False)

    def end(self):
        self.bar.stop()


def make_display(no_progress: bool = False) -> SweepDisplay:
    if not no_progress and sys.stdout.isatty():
        return RichSweepDisplay()
    return PlainSweepDisplay()


# ----------------------------------------------------------------------------- local executor


def _set_parent_death_signal() -> None:
    """Linux: SIGTERM this worker when the sweep process dies (even by SIGKILL), so the
    engine checkpoints and stops instead of training on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(worker_id: int, task_q, result_q, threads: int, parent_pid: int, cuda_device: Optional[str]) -> None:
    """A local worker: pull a cell, train it (output to its train.log), post the result; repeat."""
    _set_parent_death_signal()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; the engine handles it while training
    import queue as queue_mod

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    def parent_gone() -> bool:
        return os.getppid() != parent_pid

    def notify(kind, *args):
        result_q.put((kind, worker_id, *args))

    notify("ready")
    while not stop["flag"] and not parent_gone():
        try:
            task = task_q.get(timeout=0.5)
        except queue_mod.Empty:
            continue
        if task is None or stop["flag"]:
            break
        notify("claim", task["index"])
        try:
            result = run_cell(task, notify, should_stop=lambda: stop["flag"] or parent_gone())
        except BaseException:  # noqa: BLE001 - a bug in the sweep machinery itself: report, keep serving
            result = _result(task, "trained", {"status": "failed"}, error=traceback.format_exc().splitlines()[-1])
        if parent_gone():
            os._exit(0)  # nobody reads the queue any more: leave at once
        notify("result", result)
    if parent_gone():
        os._exit(0)


def install_interrupt_handler(handler) -> dict:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only); returns the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    return old


def restore_signal_handlers(old: dict) -> None:
    """Put back what :func:`install_interrupt_handler` replaced (a handler set outside Python,
    reported as None, stays)."""
    for s, h in old.items():
        if h is not None:
            signal.signal(s, h)


class LocalExecutor:
    """``workers`` spawned processes with ``threads`` torch threads each. Workers pull cells
    from one task queue; the parent keeps at most one queued cell per idle worker (so the
    order and any deferral stay in its hands), replaces a worker that dies, and shows the
    progress. SIGINT / SIGTERM: running cells checkpoint and stop; nothing new starts."""

    LOST_AFTER_S = 5.0  # a queued cell no idle worker claimed by then was lost with a dead worker

    def __init__(self, workers: int, threads: int, display: SweepDisplay, cuda_devices: int = 0):
        self.workers, self.threads, self.display, self.cuda_devices = workers, threads, display, cuda_devices
        self.interrupted = False
        self.exit_code = 130  # when interrupted: 130 SIGINT, 143 SIGTERM
        self._signal: Optional[int] = None

    def run(self, tasks: list[dict]) -> list[dict]:
        import multiprocessing as mp
        import queue as queue_mod

        if not tasks:
            return []
        ctx = mp.get_context("spawn")
        task_q, result_q = ctx.Queue(), ctx.Queue()
        n_workers = max(1, min(self.workers, len(tasks)))
        procs: dict[int, Any] = {}
        state: dict[int, str] = {}  # worker id -> starting | idle | busy
        claims: dict[int, int] = {}  # worker id -> cell index
        by_index = {t["index"]: t for t in tasks}
        sent: dict[int, dict] = {}  # cell index -> the task as queued
        unclaimed: dict[int, float] = {}  # queued, not yet claimed: index -> time queued
        outstanding: set[int] = set()
        pending = deque(tasks)
        deferred: list[dict] = []
        results: dict[int, dict] = {}
        counter = itertools.count()
        respawns = 0

        def spawn() -> None:
            wid = next(counter)
            dev = str(wid % self.cuda_devices) if self.cuda_devices > 1 else None
            p = ctx.Process(target=_worker_main, args=(wid, task_q, result_q, self.threads, os.getpid(), dev),
                            daemon=True, name=f"normbench-sweep-worker-{wid}")
            p.start()
            procs[wid], state[wid] = p, "starting"

        def record(index: int, result: dict) -> None:
            outstanding.discard(index)
            unclaimed.pop(index, None)
            self.display.finished(result)
            if result["outcome"] == "locked" and not sent[index].get("wait") and not stopping:
                deferred.append(by_index[index])
            else:
                results[index] = result

        stopping = False
        old_handlers = self._install_signal_handlers()
        try:
            for _ in range(n_workers):
                spawn()
            while True:
                if self._signal is not None and not stopping:
                    stopping = True
                    self.interrupted = True
                    self.display.message("stopping: running cells write a checkpoint and stop (run the sweep "
                                         "again to resume them)")
                    pending.clear()
                    deferred.clear()
                    for p in procs.values():
                        if p.is_alive() and p.pid:
                            os.kill(p.pid, signal.SIGTERM)
                if stopping:
                    if not claims or not any(p.is_alive() for p in procs.values()):
                        break
                else:
                    free = sum(1 for s in state.values() if s == "idle") - len(unclaimed)
                    while free > 0 and (pending or deferred):
                        task = pending.popleft() if pending else {**deferred.pop(0), "wait": True}
                        sent[task["index"]] = task
                        unclaimed[task["index"]] = time.monotonic()
                        outstanding.add(task["index"])
                        task_q.put(task)
                        free -= 1
                    if not pending and not deferred and not outstanding:
                        break
                try:
                    event = result_q.get(timeout=0.5)
                except queue_mod.Empty:
                    event = None
                if event is not None:
                    kind, wid = event[0], event[1]
                    if kind == "ready":
                        state[wid] = "idle"
                    elif kind == "claim":
                        state[wid], claims[wid] = "busy", event[2]
                        unclaimed.pop(event[2], None)
                    elif kind == "start":
                        self.display.started(event[2], by_index[event[2]]["name"], event[3], event[4])
                    elif kind == "step":
                        self.display.step(event[2], event[3])
                    elif kind == "result":
                        state[wid] = "idle"
                        claims.pop(wid, None)
                        result = event[2]
                        record(result["index"], result)
                        if result.get("status") == "interrupted" and self._signal is None:
                            self._signal = signal.SIGTERM  # someone stopped a cell: stop the sweep too
                    continue
                # quiet half-second: look for dead workers and for cells lost with them
                for wid, p in list(procs.items()):
                    if p.is_alive():
                        continue
                    procs.pop(wid)
                    state.pop(wid, None)
                    index = claims.pop(wid, None)
                    if index is not None:
                        record(index, _result(sent[index], "trained", {"status": "failed"},
                                              error=f"worker process died (exit code {p.exitcode}) while training "
                                                    "this cell"))
                    if not stopping and (pending or deferred or outstanding) and respawns < 4 * n_workers:
                        respawns += 1
                        spawn()
                now = time.monotonic()
                if unclaimed and any(s == "idle" for s in state.values()):
                    for index, t in list(unclaimed.items()):
                        if now - t > self.LOST_AFTER_S:
                            unclaimed[index] = now
                            task_q.put(sent[index])
                if not procs:
                    for index in sorted(outstanding):
                        record(index, _result(sent[index], "trained", {"status": "failed"},
                                              error="no worker process left to train this cell"))
                    break
        finally:
            for _ in procs:
                try:
                    task_q.put(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 60
            for p in procs.values():
                p.join(timeout=max(0.1, deadline - time.monotonic()))
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=10)
            restore_signal_handlers(old_handlers)
        return [results[t["index"]] for t in tasks if t["index"] in results]

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: leave now (workers get SIGTERM on the way out)
            self._signal = signum
            self.exit_code = 130 if signum == signal.SIGINT else 143

        return install_interrupt_handler(handler)


# ----------------------------------------------------------------------------- Ray executor

# How long the cluster named by --address may take to answer before the sweep gives up. Ray's
# own client waits about 35 s per attempt, 20 attempts, inside C++ calls that neither a
# deadline nor SIGTERM reaches, so the sweep checks first (see _ray_probe).
RAY_CONNECT_TIMEOUT_S = 12.0
_RAY_TOKEN_FIX = ("copy the head node's ~/.ray/auth_token to this machine (`ray get-auth-token` on the head "
                  "prints it; RAY_AUTH_TOKEN=... works too)")


def _ray_gcs_address(address: str) -> str:
    """``address`` (HOST:PORT or auto) as Ray will dial it; one-line UserError when malformed
    or when ``auto`` finds no cluster started on this machine."""
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--address: got '{address}'; give HOST:PORT of the head node's Ray (GCS) port, "
                            "e.g. 10.0.0.1:6379, or auto")
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # another Ray layout: let ray.init resolve it
        return address
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as err:
        raise UserError(f"--backend ray: --address {address}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _ray_use_local_token() -> None:
    """Authenticate with this machine's Ray token when RAY_AUTH_MODE is unset and a token exists
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): what `ray start --head` does
    when it starts the cluster, and what ray.init does for ``auto`` but not for HOST:PORT. A
    cluster without authentication accepts a client that sends a token."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: make this process see the mode


def _ray_auth_refused(address: str) -> UserError:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() == "token":
        why = "rejected this machine's Ray token; " + _RAY_TOKEN_FIX
    elif mode:
        why = f"requires token authentication but RAY_AUTH_MODE={mode} here; unset it (or set " \
              f"RAY_AUTH_MODE=token) and {_RAY_TOKEN_FIX}"
    else:
        why = "requires token authentication and this machine has no Ray token; " + _RAY_TOKEN_FIX
    return UserError(f"--backend ray: the Ray cluster at {address} {why}")


def _ray_probe(gcs_address: str, shown: str, timeout: float) -> None:
    """Make sure the cluster's GCS answers, within ``timeout`` s in all, with the main thread
    free for SIGINT/SIGTERM: first a plain TCP connection (retried while refused, so a head
    that is still starting gets the time), then Ray's own client in a daemon thread, which
    also tells whether the cluster accepts this machine's authentication. UserError (one
    line) when nothing answers in time, when authentication is refused, or on another failure."""
    import threading

    deadline = time.monotonic() + timeout
    host, _, port = gcs_address.rpartition(":")
    host = host.strip("[]")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"--backend ray: no Ray cluster answered at {shown} within {timeout:.0f} s "
                            "(is `ray start --head` running there, and is this its --port, 6379 by default?)")
        try:
            socket.create_connection((host, int(port)), timeout=min(left, 3.0)).close()
            break
        except socket.gaierror:
            raise UserError(f"--backend ray: --address {shown}: unknown host '{host}'") from None
        except OSError:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    try:
        from ray._raylet import GcsClient
    except ImportError:  # another Ray layout: leave the rest to ray.init
        return
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            GcsClient(address=gcs_address)
        except BaseException as err:  # noqa: BLE001
            outcome["error"] = err

    probe = threading.Thread(target=attempt, name="normbench-ray-probe", daemon=True)
    # Ray's C++ client logs its failed attempts straight to fd 2 (at 5 s and 10 s into one,
    # then at 40 s, after the sweep has given up and gone): keep them out of the one-line error
    saved, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    try:
        probe.start()
        probe.join(max(1.0, deadline - time.monotonic()))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(quiet)
    if probe.is_alive():
        raise UserError(f"--backend ray: {shown} accepts connections but no Ray cluster answered there within "
                        f"{timeout:.0f} s (is this the head node's Ray --port, 6379 by default?)")
    err = outcome.get("error")
    if err is None:
        return
    if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
        raise _ray_auth_refused(shown)
    raise UserError(f"--backend ray: cannot connect to a Ray cluster at {shown}: {_first_line(err)}")


def _ray_cell_task(task: dict) -> dict:
    """Body of one Ray task: the same locking, skipping and resuming as a local worker."""
    import torch

    threads = int(task["config"].get("threads") or 1)
    torch.set_num_threads(threads)
    try:
        return run_cell(task)
    except BaseException:  # noqa: BLE001
        return _result(task, "trained", {"status": "failed"}, error=traceback.format_exc().splitlines()[-1])


class RayExecutor:
    """Each cell a Ray task with ``num_cpus=threads`` and ``num_gpus=gpus``. ``address``:
    None starts a private local Ray instance sized to ``local_cpus`` (even with RAY_ADDRESS set);
    otherwise connect, giving up after :data:`RAY_CONNECT_TIMEOUT_S`. SIGINT/SIGTERM, while
    connecting or training, stop the sweep with exit code 130/143."""

    def __init__(self, address: Optional[str], threads: int, gpus: float, display: SweepDisplay,
                 local_cpus: Optional[int] = None):
        self.address, self.threads, self.gpus, self.display, self.local_cpus = address, threads, gpus, display, local_cpus
        self.interrupted = False
        self.exit_code = 130

    def run(self, tasks: list[dict]) -> list[dict]:
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install -e '.[ray]'") from None
        if not tasks:
            return []
        absolute_data_roots(tasks)
        old_handlers = self._install_signal_handlers()
        try:
            try:
                self._connect(ray)
            except KeyboardInterrupt:
                self.interrupted = True
                self.display.message("stopping: interrupted while connecting to Ray; nothing was submitted")
                return []
            self._install_signal_handlers()  # ray.init replaced the SIGTERM handler with its own
            return self._submit(ray, tasks)
        finally:
            try:
                ray.shutdown()
            finally:
                restore_signal_handlers(old_handlers)

    def _connect(self, ray) -> None:
        import logging

        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                  "configure_logging": True}
        if not self.address:
            try:
                ray.init(address="local", num_cpus=self.local_cpus, include_dashboard=False, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise UserError(f"--backend ray: cannot start a local Ray instance: {_first_line(err)}") from None
            return
        gcs = _ray_gcs_address(self.address)
        _ray_use_local_token()
        self.display.message(f"connecting to the Ray cluster at {self.address} "
                             f"(giving up after {RAY_CONNECT_TIMEOUT_S:.0f} s)")
        _ray_probe(gcs, self.address, RAY_CONNECT_TIMEOUT_S)
        try:
            ray.init(address=self.address, **kwargs)
        except SystemExit as err:  # the SIGTERM handler ray.init installs calls sys.exit(signum)
            if err.code == signal.SIGTERM:
                self.exit_code = 143
                raise KeyboardInterrupt from None
            raise
        except Exception as err:  # noqa: BLE001
            text = f"{err} {err.__cause__ or ''}"
            if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in text:
                raise _ray_auth_refused(self.address) from None
            hint = (" (run the sweep on a node of the cluster, one where `ray start` ran)"
                    if "No node info found" in text else "")
            raise UserError(f"--backend ray: cannot connect to a Ray cluster at {self.address}: "
                            f"{_first_line(err)}{hint}") from None

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self.exit_code = 130 if signum == signal.SIGINT else 143
            raise KeyboardInterrupt

        return install_interrupt_handler(handler)

    def _submit(self, ray, tasks: list[dict]) -> list[dict]:
        remote = ray.remote(_ray_cell_task)
        opts = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_retries": 0}
        by_index = {t["index"]: t for t in tasks}
        refs = {remote.options(**opts).remote(t): t["index"] for t in tasks}
        deferred: list[dict] = []
        results: dict[int, dict] = {}
        try:
            while refs or deferred:
                if not refs:
                    refs = {remote.options(**opts).remote({**t, "wait": True}): t["index"] for t in deferred}
                    for t in deferred:
                        by_index[t["index"]] = {**t, "wait": True}
                    deferred = []
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in done:
                    index = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        text = str(err)
                        if "No module named 'normbench'" in text:
                            raise UserError("--backend ray: the Ray workers cannot import normbench; install it "
                                            "on every node (pip install -e '.[ray]')") from None
                        result = _result(by_index[index], "trained", {"status": "failed"},
                                         error=f"Ray task failed: {text.strip().splitlines()[0][:200]}")
                    self.display.finished(result)
                    if result["outcome"] == "locked" and not by_index[index].get("wait"):
                        deferred.append(by_index[index])
                    else:
                        results[index] = result
        except KeyboardInterrupt:
            self.interrupted = True
            self.display.message("stopping: cancelling Ray tasks (finished epochs are checkpointed)")
            for ref in refs:
                ray.cancel(ref)
        return [results[t["index"]] for t in tasks if t["index"] in results]


# ----------------------------------------------------------------------------- defaults


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def default_workers(cells: list[Cell]) -> int:
    """One worker per GPU when cells run on CUDA; otherwise one per core (at most 8): small
    batches scale far better across processes than across threads."""
    on_gpu = any(c.cfg.device.startswith("cuda") or c.cfg.device == "auto" for c in cells)
    gpus = cuda_device_count() if on_gpu else 0
    if gpus:
        return gpus
    return max(1, min(8, usable_cores()))


def default_threads(workers: int) -> int:
    return max(1, usable_cores() // max(1, workers))


def local_layout(n_tasks: int, workers: Optional[int], threads: Optional[int], cells: list[Cell]) -> tuple[int, int]:
    """(workers, threads per worker) for the local executor. Defaults: one single-thread worker
    per core (small-batch cells scale far better across processes than across threads), but
    never more workers than cells to train: with fewer cells than cores, each cell gets the
    spare cores as threads (a lone cell on 2 cores trains with 2 threads, not 1)."""
    n_workers = workers or default_workers(cells)
    if threads:
        return n_workers, threads
    busy = min(n_workers, n_tasks) if n_tasks > 0 else n_workers
    return n_workers, default_threads(busy)
