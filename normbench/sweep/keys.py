"""Dotted keys of a run config (``train.batch_size``): checking that one names a value of
:class:`~normbench.config.RunConfig`, reading one from a raw (unvalidated) config, and
turning ``{dotted key: value}`` mappings into nested ones and back."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from normbench.config import RunConfig, deep_merge
from normbench.errors import UserError, did_you_mean


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def check_key(dotted: str, where: str) -> None:
    """Raise a one-line UserError unless ``dotted`` names a value of :class:`RunConfig`."""
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field_info = model.model_fields.get(part)
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


def freeze(value: Any) -> str:
    """A hashable, order-independent text of a (JSON-like) value: for "seen this one?" sets."""
    return json.dumps(value, sort_keys=True, default=str)
