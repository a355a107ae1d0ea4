"""The run configuration's schema: one pydantic model per section, validated with
``extra="forbid"`` everywhere, and :class:`RunConfig` with its config hash and run folder.

This module must stay free of torch imports at module level (``normbench --help`` is fast);
the norm-kind check imports the registry lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from normbench.errors import did_you_mean

ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
CLIP_MODES = ("none", "norm", "value", "dynamic", "agc")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")
DEFAULT_DATA_ROOT = "~/.cache/normbench/data"


def _takes_bool(annotation: Any) -> bool:
    """Whether a field of this type accepts true/false as such (bool, a Literal with True/False)."""
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    if origin in (Union, types.UnionType, Annotated):
        return any(_takes_bool(a) for a in get_args(annotation))
    return False


def _item_types(annotation: Any) -> list:
    """The item types of the list/tuple types in ``annotation`` (through Optional)."""
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return [a for a in get_args(annotation) if a is not Ellipsis]
    if origin in (Union, types.UnionType, Annotated):
        return [t for a in get_args(annotation) for t in _item_types(a)]
    return []


def _expected(annotation: Any) -> str:
    """How an error names what a field wants: 'an integer', 'a number', ..."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (
        Union, types.UnionType) else [annotation]
    if any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
        return "a section (a mapping of keys)"
    if float in args:
        return "a number"
    if int in args:
        return "an integer"
    if str in args:
        return "a string"
    return "a value of another type"


class _Section(BaseModel):
    # allow_inf_nan=False: .inf / .nan are refused in every float field (lists of floats included)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse true/false where a number (or string, section) belongs; pydantic would read
        them as 1 and 0, so that `train.batch_size: true` trained at batch 1."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _takes_bool(annotation):
            raise ValueError(f"expected {_expected(annotation)}, not a boolean")
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            items = _item_types(annotation)
            if items and not any(_takes_bool(t) for t in items):
                raise ValueError(f"expected a list of {_expected(items[0]).split(' ', 1)[1]}s, not booleans")
        return value


class DataConfig(_Section):
    root: Optional[str] = None  # None: $NORMBENCH_DATA, else ~/.cache/normbench/data
    train_subset: Optional[int] = Field(None, ge=10, le=50000)
    augment: bool = True
    allow_download: bool = True  # try torchvision's download before the bundled mirror

    def resolved_root(self) -> Path:
        root = self.root or os.environ.get("NORMBENCH_DATA") or DEFAULT_DATA_ROOT
        return Path(root).expanduser()


class ModelConfig(_Section):
    arch: Literal[ARCHS] = "resnet20"  # type: ignore[valid-type]
    width: float = Field(1.0, gt=0, le=16)


class NormConfig(_Section):
    kind: str = "bn"
    eps: Optional[float] = Field(None, gt=0, le=1)  # None: the scheme's own default
    momentum: float = Field(0.1, gt=0, le=1)  # running-statistics rate of BN-style layers
    groups: Optional[int] = Field(None, ge=1)  # GN / EvoNorm groups; default 8
    group_size: Optional[int] = Field(None, ge=1)  # channels per group (instead of groups)
    zero_init_last: bool = False  # gamma = 0 for the last norm of each residual block
    # Ghost BatchNorm
    ghost_batch_size: int = Field(16, ge=1)
    running_stats: Literal["per_step", "per_chunk"] = "per_step"
    # FRN
    learn_eps: bool = False
    # the non-linearity after FRN (and after each residual add): the paper's TLU max(y, tau), or
    # a plain ReLU max(y, 0) as the control that asks what the learned threshold buys
    frn_activation: Literal["tlu", "relu"] = "tlu"
    # Batch Renormalization: plain BN for brn_warmup_epochs, then r_max / d_max rise
    # linearly to their final values, reached at brn_r_max_epochs / brn_d_max_epochs.
    r_max: float = Field(3.0, ge=1)
    d_max: float = Field(5.0, ge=0)
    brn_warmup_epochs: float = Field(0.5, ge=0)
    brn_r_max_epochs: float = Field(2.0, ge=0)
    brn_d_max_epochs: float = Field(1.5, ge=0)
    renorm_momentum: float = Field(0.01, gt=0, le=1)
    # NF-ResNet
    nf_alpha: float = Field(0.2, gt=0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from normbench.norms import available_norms  # lazy: imports torch

        names = available_norms()
        if value not in names:
            raise ValueError(f"unknown norm '{value}'{did_you_mean(value, names)}; allowed: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _groups_xor_size(self) -> "NormConfig":
        if self.groups is not None and self.group_size is not None:
            raise ValueError("set norm.groups or norm.group_size, not both")
        return self

    @model_validator(mode="after")
    def _frn_activation_needs_frn(self) -> "NormConfig":
        if self.frn_activation != "tlu" and self.kind != "frn":
            raise ValueError(f"norm.frn_activation applies to norm.kind frn only (got kind {self.kind!r})")
        return self


class OptimConfig(_Section):
    lr: float = Field(0.1, gt=0)  # at base_batch_size; scaled linearly with the batch
    base_batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    no_decay_norm_bias: bool = False  # exclude norm parameters and biases from weight decay
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1, le=50000)  # at most the 50,000-image training set
    epochs: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)  # steps between host reads of the metrics
    channels_last: Literal["auto", True, False] = "auto"
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast (norm statistics stay fp32)
    # torch.compile mode; auto: only where measured to pay (see normbench.training.optim.compile_mode)
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = "auto"


class ClipConfig(_Section):
    mode: Literal[CLIP_MODES] = "none"  # type: ignore[valid-type]
    max_norm: float = Field(1.0, gt=0)
    max_value: float = Field(1.0, gt=0)
    alpha: float = Field(1.5, gt=0)  # dynamic: threshold = alpha * mean(last window norms) + beta
    beta: float = Field(0.0, ge=0)
    window: int = Field(50, ge=1)
    agc_lambda: float = Field(0.01, gt=0)
    agc_eps: float = Field(1e-3, gt=0)


class LogConfig(_Section):
    out_dir: str = "runs"
    tensorboard: bool = True
    # also checkpoint inside an epoch, at the first log flush this many seconds after the last
    # checkpoint (a kill -9 then loses at most this much work; epoch ends and signals always save)
    checkpoint_every_s: float = Field(300.0, gt=0)


DEFAULT_PROBE_EVERY = 100  # steps; measured probe overhead ~4% at this interval (README, Analysis)
# Fixed-mode probe distances ||theta_t - theta||_2 (normbench.analysis.fixed_probe). Measured with
# scripts/probe_distances.py on ResNet-20 (width 1, ||theta|| ~ 44), CIFAR-10, first epoch, BN at
# batch 128 and 8, GN at 128: over 0.025..0.2, ||Delta g|| / t at 0.2 is 0.63-0.93 of its value at
# 0.025 (median 0.83); below ~0.01 BN's ||Delta g|| grows like sqrt(t) (ReLU patterns flip; float64
# gives the same numbers, so it is not float32 rounding), above 0.2 it flattens further.
DEFAULT_PROBE_DISTANCES = (0.025, 0.05, 0.1, 0.2)


class AnalysisConfig(_Section):
    """Measurements inside a run (normbench.analysis): loss smoothness, the train/eval gap of
    batch statistics, dead units. Each part is opt-in,
    except ``train_mode_eval``, which costs one test pass at the end of a BN-like run."""

    probe: bool = False  # loss-landscape probe (Santurkar et al. 2018) every probe_every steps
    probe_every: int = Field(DEFAULT_PROBE_EVERY, ge=1)  # giving it (without `probe`) turns the probe on
    probe_multipliers: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # x current LR
    dead_units: bool = False  # per-layer dead-unit fractions after every epoch
    dead_units_images: int = Field(256, ge=1)  # the fixed probe batch: the first K training images
    hist_every: Optional[int] = Field(None, ge=1)  # pre-norm activation histograms; None = off
    train_mode_eval: bool = True  # test accuracy with batch statistics, for BN-like norms
    # The probe's mode. lr: every probe_every steps, along the training step's own gradient, on
    # the step's batch, at t = LR x multiplier (the step size is part of the result). fixed:
    # probes_per_run probes spread over the run, each on the same held-out batch (the first
    # probe_images test images) along its normalized gradient, at the absolute distances
    # probe_distances: the same measurement for every batch size and LR (normbench.analysis).
    probe_mode: Literal["lr", "fixed"] = "lr"
    probe_images: int = Field(512, ge=1)  # fixed mode: the probe batch, first K test images
    probe_distances: list[float] = Field(default_factory=lambda: list(DEFAULT_PROBE_DISTANCES))
    probes_per_run: int = Field(20, ge=1)  # fixed mode: at steps round(i T / (n - 1)), 0 and T included
    # precise BN at the end of a completed run (schemes with running statistics): the running
    # statistics recomputed with the weights frozen over precise_bn_images un-augmented
    # training images in batches of precise_bn_batch, then one test pass
    precise_bn: bool = False
    precise_bn_images: int = Field(10_000, ge=1)
    # The pass runs every layer in train mode, so a layer's inputs are normalized upstream by
    # the pass's own batch statistics, while at test time they are normalized by the population
    # statistics; a large batch keeps the two close (at the run's batch 2 the deep layers would
    # be calibrated on inputs no test forward produces). 500 = eval_batch_size: 20 forwards.
    precise_bn_batch: int = Field(500, ge=2)  # >= 2: a variance needs two samples

    @model_validator(mode="before")
    @classmethod
    def _probe_every_turns_probe_on(cls, data: Any) -> Any:
        """``analysis.probe_every: N`` alone means "probe every N steps"; ``null`` means off."""
        if isinstance(data, dict) and "probe_every" in data and "probe" not in data:
            data = dict(data)
            if data["probe_every"] is None:
                del data["probe_every"]
                data["probe"] = False
            else:
                data["probe"] = True
        return data

    @model_validator(mode="before")
    @classmethod
    def _fixed_mode_turns_probe_on(cls, data: Any) -> Any:
        """``analysis.probe_mode: fixed`` alone means "probe in fixed mode"."""
        if (isinstance(data, dict) and data.get("probe_mode") == "fixed" and "probe" not in data
                and "probe_every" not in data):  # (probe_every: N / null turns it on / off already)
            data = {**data, "probe": True}
        return data

    @field_validator("probe_distances")
    @classmethod
    def _positive_distances(cls, value: list[float]) -> list[float]:
        if not value or any(not (0 < v < float("inf")) for v in value):
            raise ValueError("allowed: a non-empty list of positive distances in parameter space, e.g. [0.05, 0.1]")
        return sorted(value)

    @field_validator("probe_multipliers")
    @classmethod
    def _positive_multipliers(cls, value: list[float]) -> list[float]:
        if not value or any(not (0 < v < float("inf")) for v in value):
            raise ValueError("allowed: a non-empty list of positive step multipliers, e.g. [0.5, 1, 2, 4]")
        return value


# Keys left out of the config hash while at their default: a config that leaves them at their
# default hashes (and names its run folder) exactly as the same config without these keys, as
# the committed run folders under results/ were named.
HASHED_UNLESS_DEFAULT: dict[str, tuple[str, ...]] = {
    "norm": ("frn_activation",),
    "analysis": ("probe_mode", "probe_images", "probe_distances", "probes_per_run", "precise_bn",
                 "precise_bn_images", "precise_bn_batch"),
}


class RunConfig(_Section):
    name: Optional[str] = None  # None: "<norm>-b<batch>"
    seed: int = Field(0, ge=0, le=2**64 - 1)  # the range torch.manual_seed accepts
    device: str = "auto"
    threads: Optional[int] = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    norm: NormConfig = Field(default_factory=NormConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not _NAME_RE.match(value) or ".." in value):
            raise ValueError("a run name uses letters, digits and . _ - + = only, no '/' and no '..'")
        return value

    @property
    def run_name(self) -> str:
        return self.name or f"{self.norm.kind}-b{self.train.batch_size}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """8 hex digits over everything that changes the result (not log, data root, threads).
        Keys of :data:`HASHED_UNLESS_DEFAULT` count only when they differ from their default."""
        body = self.to_dict()
        for key in ("name", "log", "threads"):
            body.pop(key, None)
        body["data"].pop("root", None)
        body["data"].pop("allow_download", None)
        for section, keys in HASHED_UNLESS_DEFAULT.items():
            fields = type(getattr(self, section)).model_fields
            for key in keys:
                if body[section].get(key) == fields[key].get_default(call_default_factory=True):
                    body[section].pop(key)
        blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_dir(self) -> Path:
        return Path(self.log.out_dir).expanduser() / f"{self.run_name}-{self.config_hash()}"
