"""The values that describe a run in TensorBoard's HParams dashboard, and their domains.

A run is described by

* every config key that defines its result (what the config hash covers: all keys but
  ``name``, ``threads``, ``log.*``, ``data.root`` and ``data.allow_download``), under its
  dotted name (``norm.kind``, ``train.batch_size``, ``clip.agc_lambda``), resolved where the
  config leaves the choice to the code (``norm.eps``: the eps the norm uses, its scheme's
  default when unset);
* ``optim.peak_lr``: the learning rate the run reaches after warm-up, ``optim.lr`` scaled
  linearly with the global batch (``optim.lr`` x global batch / ``optim.base_batch_size``);
* what the run resolved when it started (``run.device``, ``run.compile``,
  ``run.channels_last``, ``run.world_size``) and how it ended (``run.status``).

Each key has one type in every run, so that the dashboard can filter on it: a boolean key is
logged as a boolean, a number as a number, and a key that may be None or mixes kinds
(``norm.groups``, ``data.train_subset``, ``train.channels_last``, lists) always as a string,
None being ``"none"``. ``seed`` is a string too (:data:`TEXT_KEYS`): a seed may exceed 2^53,
which a float64 (TensorBoard's number) would round.

Domains: a sweep declares, for each key, the values its cells take (:func:`domains`), so that
the dashboard knows which keys vary and offers each value as a filter. The ``run.*`` keys a
run only learns when it starts are declared without a domain (any value passes a filter);
``run.status`` with every status.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel

from normbench.config import RunConfig

# Config keys that do not define a run's result (where it is written, how it is logged, how
# many threads it uses): left out, as the config hash leaves them out.
NOT_DESCRIBING = ("name", "threads", "log", "data.root", "data.allow_download")

PEAK_LR = "optim.peak_lr"
STATUS = "run.status"
STATUSES = ("completed", "diverged", "failed", "interrupted")
RUNTIME_KEYS = ("run.device", "run.compile", "run.channels_last", "run.world_size")
# Whole-number keys logged as strings: their values may exceed 2^53, where a float64 would
# round them (a rounded value lies outside its own domain, and filters would confuse seeds).
TEXT_KEYS = ("seed",)

FINAL_TEST_ACC = "hparam/final_test_acc_percent"
BEST_TEST_ACC = "hparam/best_test_acc_percent"
FINAL_TRAIN_LOSS = "hparam/final_train_loss"
# The metrics the HParams table shows for each run: tag -> (column title, description).
METRICS = {
    FINAL_TEST_ACC: ("final test acc (%)", "test accuracy at the end of a completed run, in percent"),
    BEST_TEST_ACC: ("best test acc (%)", "the best test accuracy of any evaluation of the run, in percent"),
    FINAL_TRAIN_LOSS: ("final train loss", "the mean training loss of the run's last logged interval"),
}

DESCRIPTIONS = {
    PEAK_LR: "the learning rate after warm-up: optim.lr x global batch / optim.base_batch_size",
    "norm.eps": "the eps the norm uses (its scheme's default when the config leaves norm.eps unset)",
    STATUS: "how the run ended: completed, diverged, failed or interrupted",
    "run.device": "the device the run trained on",
    "run.compile": "the torch.compile mode the run used ('none': eager)",
    "run.channels_last": "whether the run used the channels-last memory format",
    "run.world_size": "the number of processes training the run together (torchrun)",
}

Value = Union[bool, int, float, str]


def text(value: Any) -> str:
    """A config value as the string the dashboard shows: None -> "none", booleans in lower
    case, lists as JSON, numbers as Python writes them."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return repr(value)


def _kind(annotation: Any) -> str:
    """How a field is logged, from its type alone (never its value): bool, number or text."""
    if annotation is bool:
        return "bool"
    if annotation in (int, float):
        return "number"
    return "text"


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterable[tuple[str, str, Any]]:
    """(dotted key, kind, attribute path) of every leaf field of a config model."""
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, key + ".")
        else:
            yield key, "text" if key in TEXT_KEYS else _kind(annotation), key.split(".")


def _excluded(key: str) -> bool:
    return any(key == skip or key.startswith(skip + ".") for skip in NOT_DESCRIBING)


def _resolved_eps(cfg: RunConfig) -> float:
    from normbench.norms import eps_of  # lazy: imports torch

    return float(eps_of(cfg.norm))


# Keys whose value the code resolves from the config: key -> (kind, resolver).
RESOLVED = {"norm.eps": ("number", _resolved_eps)}


def peak_lr(cfg: RunConfig, world_size: int = 1) -> float:
    """The learning rate after warm-up (the same expression as training's schedule)."""
    return cfg.optim.lr * cfg.train.batch_size * world_size / cfg.optim.base_batch_size


def config_hparams(cfg: RunConfig, world_size: int = 1) -> dict[str, Value]:
    """The values of ``cfg`` that define a run, typed per key (see the module docstring)."""
    out: dict[str, Value] = {}
    for key, kind, path in _leaves(RunConfig):
        if _excluded(key):
            continue
        if key in RESOLVED:
            kind, resolve = RESOLVED[key]
            value = resolve(cfg)
        else:
            value = cfg
            for part in path:
                value = getattr(value, part)
        out[key] = value if kind in ("bool", "number") else text(value)
    out[PEAK_LR] = peak_lr(cfg, world_size)
    return out


def runtime_hparams(device: Any, compile_mode: Optional[str], channels_last: bool, world_size: int) -> dict[str, Value]:
    """What a run resolved when it started, as strings (declared without a domain)."""
    return {"run.device": str(device), "run.compile": text(compile_mode), "run.channels_last": text(channels_last),
            "run.world_size": str(world_size)}


def final_metrics(status: str, last_eval: dict, best_acc: float, last_train_loss: Optional[float]) -> dict[str, float]:
    """The HParams table's metrics of a run that ended as ``status``; a metric the run has no
    finite value for is left out (the table shows it empty)."""
    values = {FINAL_TEST_ACC: 100 * last_eval["acc"] if status == "completed" and last_eval else None,
              BEST_TEST_ACC: 100 * best_acc if last_eval else None,
              FINAL_TRAIN_LOSS: last_train_loss}
    return {tag: float(v) for tag, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def kind_of(value: Value) -> str:
    """bool, number or text: the type a value is logged as."""
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "text"


Domains = dict[str, Optional[list]]


def domains(hparam_sets: Iterable[dict[str, Value]]) -> Domains:
    """Each key's domain over the given runs: the sorted distinct values they take; None (no
    domain: any value passes a filter) for the ``run.*`` keys a run learns when it starts;
    every status for ``run.status``. A key whose runs log it with different types (which
    config_hparams never does) falls back to strings."""
    seen: dict[str, set] = {}
    for hparams in hparam_sets:
        for key, value in hparams.items():
            if key not in RUNTIME_KEYS and key != STATUS:
                seen.setdefault(key, set()).add(value)
    out: Domains = {key: sorted_values(values) for key, values in seen.items()}
    out.update({key: None for key in RUNTIME_KEYS})
    out[STATUS] = list(STATUSES)
    return out


def sorted_values(values: Iterable[Value]) -> list:
    """Distinct values of one key, sorted; mixed types become their strings."""
    values = set(values)
    if len({kind_of(v) for v in values}) > 1:
        values = {text(v) for v in values}
    return sorted(values)


def merge_domains(old: Domains, new: Domains) -> Domains:
    """``old`` widened by ``new``: the union of each key's values; a key without a domain on
    either side stays without one; a key whose type changed takes the new domain."""
    out = dict(old)
    for key, values in new.items():
        before = out.get(key, [])
        if values is None or before is None:
            out[key] = None
        elif before and values and kind_of(before[0]) != kind_of(values[0]):
            out[key] = list(values)
        else:
            out[key] = sorted_values([*before, *values])
    return out


def within(hparams: dict[str, Value], known: Domains) -> bool:
    """Whether every value of a run lies in the declared domains (a value outside its key's
    domain would be filtered out of the dashboard)."""
    for key, value in hparams.items():
        if key not in known:
            return False
        allowed = known[key]
        if allowed is not None and (value not in allowed or kind_of(value) != kind_of(allowed[0])):
            return False
    return True


__all__ = ["BEST_TEST_ACC", "DESCRIPTIONS", "Domains", "FINAL_TEST_ACC", "FINAL_TRAIN_LOSS", "METRICS", "PEAK_LR",
           "RUNTIME_KEYS", "STATUS", "STATUSES", "TEXT_KEYS", "config_hparams", "domains", "final_metrics", "kind_of",
           "merge_domains", "peak_lr", "runtime_hparams", "text", "within"]
