"""One line about what a run config trains (``ResNet-20, BN, batch 128, 30 epochs, lr 0.1
cosine, the full training set, device auto``), read from the config itself, and the
settings a method recipe gives its scheme. Names of methods come from :mod:`normbench.report.styles`."""
from __future__ import annotations

from typing import Any

from normbench.report.styles import display_name


def _section(config: dict, name: str) -> dict:
    node = config.get(name)
    return node if isinstance(node, dict) else {}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def arch_name(model: dict) -> str:
    """``resnet20`` -> ``ResNet-20`` (with `` width 0.5`` when the width is not 1)."""
    arch = str(model.get("arch", "resnet20"))
    name = f"ResNet-{arch[len('resnet'):]}" if arch.startswith("resnet") else arch
    width = model.get("width", 1)
    return name if width in (1, 1.0) else f"{name} width {_number(width)}"


def describe_run(config: dict) -> str:
    """The model, method, batch, budget, learning rate, data and device of a resolved config."""
    train, optim, data = _section(config, "train"), _section(config, "optim"), _section(config, "data")
    subset = data.get("train_subset")
    images = f"{subset:,} training images" if subset else "the full training set"
    epochs = train.get("epochs")
    return (f"{arch_name(_section(config, 'model'))}, {display_name(config)}, batch {train.get('batch_size')}, "
            f"{epochs} epoch{'s' if epochs != 1 else ''}, lr {_number(optim.get('lr'))} at batch "
            f"{optim.get('base_batch_size')} {optim.get('schedule')}, {images}, device {config.get('device')}")


def recipe_settings(recipe: dict) -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs a method recipe file sets for its scheme and its clipping,
    besides the scheme and the mode themselves: ``[("norm.groups", 8)]``."""
    return [(f"{section}.{key}", value) for section, skip in (("norm", "kind"), ("clip", "mode"))
            for key, value in _section(recipe, section).items() if key != skip]
