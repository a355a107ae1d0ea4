"""Reading a run configuration: YAML files (safe loader, duplicate keys refused), merged left to
right, ``--set`` overrides, validation into a :class:`~normbench.config.schema.RunConfig`, and
every mistake as one :class:`~normbench.errors.UserError` line that names the dotted key, what
was given and what is allowed.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from normbench.errors import UserError, did_you_mean

from normbench.config.schema import RunConfig


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (at any depth), where
    plain YAML loading silently keeps the last one. Merge keys (``<<``) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # unhashable key: the base constructor reports it
                    continue
                if seen:
                    raise DuplicateKeyError(
                        None, None, f"key '{key}' is given twice (first at line {first_line[key]})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """Safe-load one YAML document with :class:`UniqueKeyLoader`."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """Safe-load a YAML file (UTF-8, no duplicate keys); any problem becomes one line naming
    the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    if b"\0" in blob:
        raise UserError(f"{path} is a binary file (it holds NUL bytes), not UTF-8 YAML text")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        line = blob[:err.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text (byte 0x{blob[err.start]:02x}); "
                        "save the file as UTF-8") from None
    try:
        return load_yaml_text(text)
    except DuplicateKeyError as err:
        mark = err.problem_mark
        raise UserError(f"{path} line {mark.line + 1}: {err.problem}; YAML would silently keep only "
                        "the last, so give each key once") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"YAML syntax error in {path}{where}: {problem}") from None


def deep_merge(base: dict, top: dict) -> dict:
    """Return base updated by top, merging nested dicts key by key."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config_dict(path: Path, _seen: tuple = ()) -> dict:
    """Read a config file as a dict, following its optional ``base:`` chain (relative paths)."""
    path = Path(path).resolve()
    if path in _seen:
        raise UserError(f"config 'base' chain loops back to {path}")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"base: got {base!r}; allowed: a path to another config file")
    return deep_merge(load_config_dict(path.parent / base, _seen + (path,)), raw)


def _same_value(a: Any, b: Any) -> bool:
    """Equality that keeps true/false apart from 1/0 (also inside lists and mappings)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a == b


def _leaves(key: str, value: Any) -> dict[str, Any]:
    """``train={epochs: 2}`` -> {'train.epochs': 2}: a mapping value sets its keys one by one."""
    if not isinstance(value, dict) or not value:
        return {key: value}
    out: dict[str, Any] = {}
    for sub, inner in value.items():
        out.update(_leaves(f"{key}.{sub}", inner))
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``a.b=value`` strings (value as YAML) into {dotted key: value}. A mapping value
    (``train={epochs: 2}``) stands for its keys (``train.epochs=2``); a key given twice with
    different values, directly or through a mapping, is an error."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # leaf key -> the --set item that set it
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", key):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. norm.kind=gn")
        try:
            value = load_yaml_text(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {key}: value {text!r} is not valid YAML") from None
        for leaf, leaf_value in _leaves(key, value).items():
            if leaf in out and not _same_value(out[leaf], leaf_value):
                via = [f"--set {k}" for k in dict.fromkeys((given_as[leaf], key)) if k != leaf]
                how = f" (via {' and '.join(via)})" if via else ""
                raise UserError(f"--set {leaf} given twice with different values: {out[leaf]!r} and "
                                f"{leaf_value!r}{how}")
            out[leaf] = leaf_value
            given_as.setdefault(leaf, key)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set each dotted key in a copy of ``raw`` (a mapping value merges into the section there);
    a non-section on the path is an error."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise UserError(f"--set {dotted}: '{where}' is a value, not a section")
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    """The field names valid at the parent of ``loc``."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line for the first error: dotted key, what was given, what is allowed."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if isinstance(p, str))
    key = ".".join(loc) or "(top level)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        prefix = ".".join(loc[:-1])
        hint = did_you_mean(loc[-1], allowed).replace("'", "'" + (prefix + "." if prefix else ""), 1)
        return f"{source}: unknown key '{key}'{hint}; allowed here: {', '.join(allowed)}{more}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first["type"] == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        given = first.get("input")
        msg = f"allowed: {expected}{did_you_mean(given, re.findall(chr(39) + '([^' + chr(39) + ']+)' + chr(39), expected))}"
    given = first.get("input")
    shown = f"got {given!r}; "
    return f"{source}: {key}: {shown}{msg}{more}"


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


def load_config(path: Union[None, str, Path, list, tuple], overrides: Optional[list[str]] = None,
                source: Optional[str] = None) -> RunConfig:
    """Resolve a run config: the file(s) (each with its base chain; several files merge left to
    right, a later file overriding an earlier one key by key), then ``--set`` overrides, then
    validation. ``source`` names the config in error lines (default: the files' paths)."""
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [] if path is None else [Path(path)]
    raw: dict = {}
    for one in paths:
        raw = deep_merge(raw, load_config_dict(one))
    # --set items nest into a mapping of their own, merged over the files key by key: a --set
    # through a key that a file gives as a value (seed.x over seed: 0) replaces that value, and
    # validation then names the key and what it got
    raw = deep_merge(raw, apply_overrides({}, parse_overrides(overrides or [])))
    return validate_config(raw, source=source or " + ".join(map(str, paths)) or "config")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
