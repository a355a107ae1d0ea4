"""How the report names and draws a method: display names, a fixed style per method, and
the protocol line of every plot title.

One mapping, used by every table and plot: ``norm.kind`` -> the name the README uses (BN,
GN, FRN + TLU, ...). A run whose clipping mode or FRN activation differs from its scheme's
default gets a suffix ("no norm, no clipping", "no norm + dynamic clipping", "FRN + ReLU");
the scheme's default is what ``configs/methods/<kind>.yaml`` trains (AGC for ``none``, TLU for
``frn``, no clipping otherwise).

Every method has a fixed colour *and* marker (:data:`STYLES`), so a method looks the same in
every plot whichever other methods a folder holds, and two methods never differ by a shade
alone: the fixed colours are at least 25 CIELAB units apart (``tests/test_report.py``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, NamedTuple, Optional

NAMES = {
    "bn": "BN", "ghost_bn": "Ghost BN", "brn": "Batch Renorm", "syncbn": "SyncBN", "gn": "GN", "ln": "LN",
    "in": "IN", "ws_gn": "WS + GN", "frn": "FRN", "evonorm_s0": "EvoNorm-S0", "nf": "NF-ResNet", "none": "no norm",
}
# The clipping each scheme's recipe trains with (configs/methods/<kind>.yaml): no suffix then.
DEFAULT_CLIP = {"none": "agc"}
CLIP_NAMES = {"norm": "norm clipping", "value": "value clipping", "dynamic": "dynamic clipping"}
AGC_LAMBDA_DEFAULT = 0.01  # ClipConfig.agc_lambda, for configs that do not spell it out
GHOST_DEFAULT = 16  # NormConfig.ghost_batch_size


class Style(NamedTuple):
    colour: str
    marker: str


# style key (see style_key) -> fixed colour and marker; no two share either.
STYLES = {
    "bn": Style("#1f4fa3", "o"), "ghost_bn": Style("#56b4e9", "D"), "brn": Style("#7b3294", "s"),
    "syncbn": Style("#00868b", "P"), "gn": Style("#1b9e3e", "^"), "ln": Style("#8c510a", "v"),
    "in": Style("#e7298a", "<"), "ws_gn": Style("#a6a600", ">"), "frn": Style("#f28e1c", "p"),
    "frn+relu": Style("#fdbf6f", "h"), "evonorm_s0": Style("#808080", "H"), "nf": Style("#d7191c", "X"),
    "none+agc": Style("#000000", "d"), "none": Style("#b2abd2", "8"), "none+dynamic": Style("#80cdc1", "*"),
}
# For methods beyond STYLES (a second GN variant, a clipping mode on BN, ...), in turn.
EXTRA_COLOURS = ("#fb9a99", "#ffd92f", "#053061", "#bf812d", "#4dac26")
EXTRA_MARKERS = ("o", "s", "^", "D", "v", "p")


def _section(config: Any, name: str) -> dict:
    node = config.get(name) if isinstance(config, dict) else None
    return node if isinstance(node, dict) else {}


def _clip(config: dict) -> str:
    mode = _section(config, "clip").get("mode", "none")
    return "none" if mode in (None, "none") else str(mode)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def display_name(config: dict) -> str:
    """The README's name of the method a run config trains, e.g. ``no norm + AGC (λ 0.16)``."""
    norm = _section(config, "norm")
    kind = str(norm.get("kind", "?"))
    name = NAMES.get(kind, kind)
    if kind == "frn":
        name += " + ReLU" if norm.get("frn_activation", "tlu") == "relu" else " + TLU"
    if kind == "ghost_bn":
        name += f" (ghost {_num(norm.get('ghost_batch_size', GHOST_DEFAULT))})"
    clip = _clip(config)
    if clip == "none":
        return name if DEFAULT_CLIP.get(kind, "none") == "none" else f"{name}, no clipping"
    if clip == "agc":
        return f"{name} + AGC (λ {_num(_section(config, 'clip').get('agc_lambda', AGC_LAMBDA_DEFAULT))})"
    return f"{name} + {CLIP_NAMES.get(clip, clip + ' clipping')}"


# Config keys display_name already shows (so a method label does not repeat them).
SHOWN_KEYS = ("norm.kind", "clip.mode", "clip.agc_lambda", "norm.frn_activation", "norm.ghost_batch_size")


def method_label(config: dict, extra: Iterable[tuple[str, Any]] = ()) -> str:
    """``display_name`` plus ``key=value`` for each further config key that sets the method
    apart from another one in the same report (``GN (groups=16)``)."""
    rest = [f"{key.split('.')[-1]}={_num(value)}" for key, value in extra if key not in SHOWN_KEYS]
    return display_name(config) + (f" ({', '.join(rest)})" if rest else "")


def style_key(config: dict) -> str:
    """The method family a fixed style belongs to: the norm kind, ``+clip mode`` when clipping
    is on, ``frn+relu`` for FRN with a ReLU."""
    norm = _section(config, "norm")
    kind = str(norm.get("kind", "?"))
    clip = _clip(config)
    key = kind if clip == "none" else f"{kind}+{clip}"
    return key + "+relu" if kind == "frn" and norm.get("frn_activation", "tlu") == "relu" else key


def assign_styles(items: Iterable[tuple[str, str]]) -> dict[str, Style]:
    """``(name, style key)`` pairs, in report order -> a style per name: the first name of a
    style key gets the key's fixed style, any later one (or an unknown key) the next unused
    extra colour and marker. The result depends only on the names and their order."""
    out: dict[str, Style] = {}
    taken: set[str] = set()
    extra = 0
    for name, key in items:
        if name in out:
            continue
        if key in STYLES and key not in taken:
            out[name] = STYLES[key]
            taken.add(key)
        else:
            out[name] = Style(EXTRA_COLOURS[extra % len(EXTRA_COLOURS)], EXTRA_MARKERS[extra % len(EXTRA_MARKERS)])
            extra += 1
    return out


# ----------------------------------------------------------------------------- protocol line


def _range(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def protocol(summaries: Iterable[dict], group: Optional[Callable[[dict], str]] = None) -> str:
    """What the runs behind a plot are, for its title, read from their summaries, e.g.
    ``ResNet-20 / CIFAR-10, 6 epochs, 4/4/2/2 seeds at batch 2/8/32/128``: the number of
    completed runs per method at each batch size (``3–4`` when methods differ); ``group``
    names a run's method (default: its display name)."""
    group = group or (lambda s: display_name(s.get("config") or {}))
    done = [s for s in summaries if isinstance(s, dict) and s.get("status") == "completed"
            and isinstance(s.get("config"), dict)]
    if not done:
        return "no completed run"
    archs = {str(_section(s["config"], "model").get("arch", "?")) for s in done}
    arch = re.sub(r"^resnet(\d+)$", r"ResNet-\1", archs.pop()) if len(archs) == 1 else "ResNet"
    subsets = {_section(s["config"], "data").get("train_subset") for s in done}
    data = "CIFAR-10" if subsets == {None} else f"CIFAR-10 ({'/'.join(sorted(_num(x) for x in subsets if x))} "\
                                                 "training images)"
    raw = {_section(s["config"], "train").get("epochs", "?") for s in done}
    numbers = sorted(e for e in raw if isinstance(e, (int, float)) and not isinstance(e, bool))
    epochs = [_num(e) for e in numbers] + sorted(str(e) for e in raw if e not in numbers)
    per: dict[int, dict[str, set]] = {}
    for s in done:
        batch = _section(s["config"], "train").get("batch_size")
        if isinstance(batch, int):
            per.setdefault(batch, {}).setdefault(group(s), set()).add(s["config"].get("seed", 0))
    batches = sorted(per)
    seeds = "/".join(_range([len(v) for v in per[b].values()]) for b in batches)
    ep = f"{epochs[0]} epoch{'s' if epochs[0] != '1' else ''}" if len(epochs) == 1 else f"epochs {'/'.join(epochs)}"
    noun = "seed" if seeds == "1" else "seeds"
    return f"{arch} / {data}, {ep}, {seeds} {noun} at batch {'/'.join(map(str, batches))}"
