"""The normalization registry: a scheme's name -> how to build its layers.

Models never branch on the scheme. They ask the registry for

* ``norm_act(cfg, channels, apply_act, layer)``: the norm and the non-linearity that follows
  it, as one unit (:class:`NormAct`); FRN pairs with TLU, EvoNorm-S0 carries its own
  non-linearity, ``none`` is identity + ReLU;
* ``post_add_act(cfg, channels, layer)``: the non-linearity after a residual add;
* ``conv(cfg, in_ch, out_ch, kernel, stride)``: the convolution in front of a norm
  (weight-standardized for ``ws_gn``).

Adding a scheme is one class (in batch.py, sample.py or weight.py) and one ``register`` line
at the bottom of this file. What each scheme computes (equations, defaults, sources, project
choices) is specified in docs/methods.md, one section per name (docs/methods.md#gn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from normbench.errors import UserError

DEFAULT_GROUPS = 8


class NormAct(nn.Module):
    """A normalization layer followed by its activation (or none when ``act`` is None)."""

    def __init__(self, norm: nn.Module, act: Optional[nn.Module]):
        super().__init__()
        self.norm = norm
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):  # mixed precision: statistics in fp32
            return self.act(self.norm(x.float()))
        return self.act(self.norm(x))


def plain_conv(cfg, in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Module:
    """A bias-free convolution (a norm follows it, so a bias would be redundant)."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


def relu_after_add(cfg, channels: int, layer: str) -> nn.Module:
    return nn.ReLU(inplace=True)


def resolve_groups(cfg, channels: int, layer: str) -> int:
    """Number of groups for a group-wise norm at ``channels``; an error names the layer."""
    if cfg.group_size is not None:
        if channels % cfg.group_size:
            raise UserError(f"norm.group_size={cfg.group_size} does not divide the {channels} channels of layer {layer}")
        return channels // cfg.group_size
    groups = cfg.groups or DEFAULT_GROUPS
    if channels % groups:
        raise UserError(f"norm.groups={groups} does not divide the {channels} channels of layer {layer}")
    return groups


@dataclass(frozen=True)
class NormScheme:
    """How one normalization scheme builds its pieces; see the module docstring."""

    name: str
    norm_act: Callable[..., nn.Module]
    post_add_act: Callable[..., nn.Module] = relu_after_add
    conv: Callable[..., nn.Module] = plain_conv
    batch_dependent: bool = False  # statistics mix samples: train/eval-mode gap applies
    normalizes: str = ""  # what the statistics are computed over, for docs and reports
    paper: str = ""
    default_eps: float = 1e-5
    compile_max_batch: int = 0  # train.compile=auto compiles the model on CPU up to this batch size
    prefers_channels_last: bool = True  # CPU speed: channels_last helps the convs (measured below)
    channels_last_needs_kernels: bool = False  # ... only with the fused kernels (else NCHW on CPU)


_REGISTRY: dict[str, NormScheme] = {}


def register(scheme: NormScheme) -> None:
    _REGISTRY[scheme.name] = scheme


def available_norms() -> list[str]:
    return list(_REGISTRY)


def get_scheme(name: str) -> NormScheme:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown norm '{name}'; allowed: {', '.join(_REGISTRY)}") from None


def eps_of(cfg) -> float:
    return cfg.eps if cfg.eps is not None else get_scheme(cfg.kind).default_eps


def _relu_if(apply_act: bool) -> Optional[nn.Module]:
    return nn.ReLU(inplace=True) if apply_act else None


# ----------------------------------------------------------------------------- schemes
from normbench.norms import batch, sample, weight  # noqa: E402  (the layers import the helpers above)

# prefers_channels_last (True for every scheme): from `scripts/bench_norms.py --model --model-only
# --schemes ...` with the fused kernels (ResNet-20 width 1, forward + backward on the 2-core CPU,
# 1 thread, both memory formats interleaved, best of 3; ms per step NCHW / channels_last at batch
# 2 and 128): bn 11.3/10.1, 442/352; gn 11.5/10.6, 441/370; ln 11.5/10.3, 429/357; in 11.6/10.9,
# 401/341; ws_gn 16.9/15.1, 395/341; brn 11.8/10.8, 434/356; ghost_bn 11.2/10.0, 383/349;
# frn 11.9/10.9, 419/359; evonorm_s0 11.4/10.4, 407/343; nf 16.3/15.1, 395/344. Without the
# kernels, PyTorch's GroupNorm kernel is ~10x slower on channels_last, so the schemes flagged
# channels_last_needs_kernels (gn/ln/in/ws_gn/brn) run NCHW there; the kernels have no such
# penalty and the convolutions are faster in channels_last.
# compile_max_batch (what train.compile=auto compiles on CPU, up to that batch size): measured
# with FlatSGD and the fused kernels by scripts/bench_compile.py (eager and compiled engines
# built side by side, 7 interleaved rounds of 1 s windows, 2 threads; median over rounds of
# compiled / eager img/s; under compile the layers take their PyTorch path, which inductor fuses):
#   batch 2:  bn 1.16, ghost_bn 1.18, brn 1.25, ln 1.24, in 1.18, ws_gn 1.51, evonorm_s0 1.07
#             (medians 188 eager vs 177 compiled: noise), nf 1.28, none 1.10
#   batch 8:  bn 1.13, ghost_bn 1.10, brn 1.03, ln 1.01, in 1.16, ws_gn 1.12, evonorm_s0 0.97,
#             nf 0.87, none 1.06
#   batch 32: bn 1.046, ghost_bn 1.07, in 1.07, ws_gn 0.92, none 1.07
# A scheme compiles up to the largest batch where compiling won at least 5% in every
# measurement (and at every smaller one): brn at 8 won x1.11 in one run of
# `scripts/bench_compile.py --schemes frn,gn,brn --batches 2,8`, not in the other, so brn
# compiles at 2 only; gn and frn: see their entries.
register(NormScheme(
    "bn",
    lambda cfg, c, act, layer: NormAct(batch.BatchNorm2d(c, eps_of(cfg), cfg.momentum, layer, relu=act),
                                       None),  # the ReLU is fused into the layer
    batch_dependent=True, normalizes="(B, H, W) per channel", paper="Ioffe & Szegedy 2015",
    compile_max_batch=8))
register(NormScheme(
    "ghost_bn",
    lambda cfg, c, act, layer: NormAct(
        batch.GhostBatchNorm2d(c, eps_of(cfg), cfg.momentum, cfg.ghost_batch_size, cfg.running_stats, layer,
                               relu=act),
        None),  # the ReLU is fused into the layer (normbench.norms.native)
    batch_dependent=True, normalizes="(b, H, W) per channel, per chunk of ghost_batch_size samples",
    paper="Hoffer, Hubara & Soudry 2017",
    compile_max_batch=32))
register(NormScheme(
    "brn",
    lambda cfg, c, act, layer: NormAct(
        batch.BatchRenorm2d(c, eps_of(cfg), cfg.renorm_momentum, cfg.r_max, cfg.d_max, cfg.brn_warmup_epochs,
                            cfg.brn_r_max_epochs, cfg.brn_d_max_epochs, layer, relu=act),
        None),  # the ReLU is fused into the layer (normbench.norms.native)
    batch_dependent=True, normalizes="(B, H, W) per channel, corrected by r, d towards the moving statistics",
    paper="Ioffe 2017",
    channels_last_needs_kernels=True,
    compile_max_batch=2))
register(NormScheme(
    "gn",
    lambda cfg, c, act, layer: NormAct(sample.GroupNorm(resolve_groups(cfg, c, layer), c, eps_of(cfg), relu=act),
                                       None),  # the ReLU is fused into the layer
    normalizes="(C/G, H, W) per sample and group", paper="Wu & He 2018",
    # measured with the fused kernels, channels_last: compiled / eager img/s (scripts/
    # bench_throughput.py --compare-compile, torch's SGD) 194/167 at batch 2, 442/370 at 8,
    # 507/599 at 32, 565/699 at 128; with FlatSGD (scripts/bench_compile.py) 186/165 (x1.13)
    # at 2, 422/450 (x0.94) at 8, so compiled at batch 2 only
    compile_max_batch=2,
    channels_last_needs_kernels=True))
register(NormScheme(
    "ln",
    lambda cfg, c, act, layer: NormAct(sample.LayerNorm2d(c, eps_of(cfg), relu=act), None),
    normalizes="(C, H, W) per sample", paper="Ba, Kiros & Hinton 2016",
    channels_last_needs_kernels=True,
    compile_max_batch=2))
register(NormScheme(
    "in",
    lambda cfg, c, act, layer: NormAct(sample.InstanceNorm2d(c, eps_of(cfg), relu=act), None),
    normalizes="(H, W) per sample and channel", paper="Ulyanov, Vedaldi & Lempitsky 2016",
    channels_last_needs_kernels=True,
    compile_max_batch=32))
register(NormScheme(
    "ws_gn",
    lambda cfg, c, act, layer: NormAct(sample.GroupNorm(resolve_groups(cfg, c, layer), c, eps_of(cfg), relu=act),
                                       None),  # the ReLU is fused into the layer
    conv=weight.standardized_conv,
    normalizes="(C/G, H, W) per sample and group; conv weights per output filter over (C_in, kh, kw)",
    paper="Qiao et al. 2019 (WS) + Wu & He 2018 (GN)",
    channels_last_needs_kernels=True,
    compile_max_batch=8))


def _frn_act(cfg, c: int, act: bool, layer: str) -> NormAct:
    """FRN with its TLU fused into the layer (``norm.frn_activation: tlu``, the paper), or
    with a plain ReLU after it (``relu``, a control: FRN's output y, then max(y, 0)); no
    non-linearity on a block's second norm either way."""
    relu = getattr(cfg, "frn_activation", "tlu") == "relu"
    norm = sample.FilterResponseNorm2d(c, eps_of(cfg), cfg.learn_eps, tlu=act and not relu)
    return NormAct(norm, _relu_if(act and relu))


def _frn_post_add_act(cfg, c: int, layer: str) -> nn.Module:
    """After a residual add of an FRN network: a TLU with its own tau, or ReLU under ``relu``."""
    return relu_after_add(cfg, c, layer) if getattr(cfg, "frn_activation", "tlu") == "relu" else sample.TLU(c)


register(NormScheme(
    "frn",
    # TLU replaces the ReLU (fused into the layer); no TLU on a block's second norm;
    # norm.frn_activation: relu puts a plain ReLU back in both places (a control)
    _frn_act,
    post_add_act=_frn_post_add_act,  # the post-add ReLU becomes a TLU (own tau)
    normalizes="(H, W) per sample and channel, mean square, no centering", paper="Singh & Krishnan 2019",
    # measured with the fused kernels: compiled / eager img/s (scripts/bench_throughput.py
    # --compare-compile, 2 threads, torch's SGD) 173/158 at batch 2, 401/321 at 8, 639/563 at
    # 32, 573/595 at 128; with FlatSGD (scripts/bench_compile.py) x1.26 at 2, x1.16 at 8
    default_eps=1e-6, compile_max_batch=32))
register(NormScheme(
    "evonorm_s0",
    lambda cfg, c, act, layer: NormAct(sample.EvoNormS0(c, resolve_groups(cfg, c, layer), eps_of(cfg), act), None),
    normalizes="(C/G, H, W) per sample and group (std only), with its own sigmoid gate",
    paper="Liu, Brock, Simonyan & Le 2020",
    # measured with the fused kernels: compiled / eager img/s (scripts/bench_throughput.py
    # --compare-compile, 2 threads, torch's SGD) 190/179 at batch 2, 357/359 at 8, 481/534 at
    # 32, 544/642 at 128, and with FlatSGD (table above): so eager.
    compile_max_batch=0))
register(NormScheme(
    "none",
    lambda cfg, c, act, layer: NormAct(nn.Identity(), _relu_if(act)),
    normalizes="nothing (identity)", paper="-",
    compile_max_batch=32))

from normbench.norms import sync  # noqa: E402

register(NormScheme(
    "syncbn",
    lambda cfg, c, act, layer: NormAct(sync.SyncBatchNorm2d(c, eps_of(cfg), cfg.momentum, layer), _relu_if(act)),
    batch_dependent=True, normalizes="(global B across processes, H, W) per channel",
    paper="Ioffe & Szegedy 2015; Peng et al. 2018 (MegDet) for cross-GPU statistics"))
register(NormScheme(
    "nf",
    # The architecture is replaced (normbench.models.nf_resnet, via ARCH_OVERRIDES); these
    # pieces only matter if a plain ResNet is built with kind nf: no norm, a gain-scaled ReLU.
    lambda cfg, c, act, layer: NormAct(nn.Identity(), weight.ScaledReLU() if act else None),
    post_add_act=lambda cfg, c, layer: weight.ScaledReLU(),
    conv=weight.scaled_ws_conv,
    normalizes="nothing: scaled weight standardization + variance-preserving residual scaling",
    paper="Brock, De & Smith 2021a",
    compile_max_batch=2))

import normbench.models.nf_resnet  # noqa: E402,F401  (registers ARCH_OVERRIDES["nf"])
