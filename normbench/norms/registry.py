"""The normalization registry: a scheme's name -> how to build its layers.

Models never branch on the scheme. They ask the registry for

* ``norm_act(cfg, channels, apply_act, layer)``: the norm and the non-linearity that follows
  it, as one unit (:class:`NormAct`); FRN pairs with TLU, EvoNorm-S0 carries its own
  non-linearity, ``none`` is identity + ReLU;
* ``post_add_act(cfg, channels, layer)``: the non-linearity after a residual add;
* ``conv(cfg, in_ch, out_ch, kernel, stride)``: the convolution in front of a norm
  (weight-standardized for ``ws_gn``).

Adding a scheme is one layer class (in the file of its family) and one ``register`` line
below. What each scheme computes (equations, defaults, sources, project choices) is specified in
docs/methods.md, one section per name (docs/methods.md#gn).

Besides what to build, a scheme carries three CPU speed settings that the engine reads
(``compile_max_batch``, ``prefers_channels_last``, ``channels_last_needs_kernels``); each was
measured, and the measurements and the commands that produced them are in
docs/performance.md#per-scheme-speed-settings.

The registry builds layers, never models: the normalizer-free ResNet, which replaces the
architecture for ``nf``, is registered by normbench.models (``ARCH_OVERRIDES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from normbench.errors import UserError
from normbench.norms import batch_norm, batch_renorm, evonorm, filter_response, ghost_batch_norm, group_norm
from normbench.norms import sync_batch_norm, weight_standardization
from normbench.norms.norm_act import NormAct

DEFAULT_GROUPS = 8


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
    # CPU speed settings, each measured (docs/performance.md#per-scheme-speed-settings):
    compile_max_batch: int = 0  # train.compile=auto compiles the model on CPU up to this batch size
    prefers_channels_last: bool = True  # channels_last helps the convs
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
# The speed settings of each scheme (compile_max_batch, channels_last_needs_kernels) were
# measured; docs/performance.md#per-scheme-speed-settings has the figures and the commands.
register(NormScheme(
    "bn",
    lambda cfg, c, act, layer: NormAct(batch_norm.BatchNorm2d(c, eps_of(cfg), cfg.momentum, layer, relu=act),
                                       None),  # the ReLU is fused into the layer
    batch_dependent=True, normalizes="(B, H, W) per channel", paper="Ioffe & Szegedy 2015",
    compile_max_batch=8))
register(NormScheme(
    "ghost_bn",
    lambda cfg, c, act, layer: NormAct(
        ghost_batch_norm.GhostBatchNorm2d(c, eps_of(cfg), cfg.momentum, cfg.ghost_batch_size, cfg.running_stats,
                                          layer, relu=act),
        None),  # the ReLU is fused into the layer (normbench.norms.speed)
    batch_dependent=True, normalizes="(b, H, W) per channel, per chunk of ghost_batch_size samples",
    paper="Hoffer, Hubara & Soudry 2017",
    compile_max_batch=32))
register(NormScheme(
    "brn",
    lambda cfg, c, act, layer: NormAct(
        batch_renorm.BatchRenorm2d(c, eps_of(cfg), cfg.renorm_momentum, cfg.r_max, cfg.d_max,
                                   cfg.brn_warmup_epochs, cfg.brn_r_max_epochs, cfg.brn_d_max_epochs, layer,
                                   relu=act),
        None),  # the ReLU is fused into the layer (normbench.norms.speed)
    batch_dependent=True, normalizes="(B, H, W) per channel, corrected by r, d towards the moving statistics",
    paper="Ioffe 2017",
    channels_last_needs_kernels=True,
    compile_max_batch=2))
register(NormScheme(
    "gn",
    lambda cfg, c, act, layer: NormAct(
        group_norm.GroupNorm(resolve_groups(cfg, c, layer), c, eps_of(cfg), relu=act),
        None),  # the ReLU is fused into the layer
    normalizes="(C/G, H, W) per sample and group", paper="Wu & He 2018",
    compile_max_batch=2,
    channels_last_needs_kernels=True))
register(NormScheme(
    "ln",
    lambda cfg, c, act, layer: NormAct(group_norm.LayerNorm2d(c, eps_of(cfg), relu=act), None),
    normalizes="(C, H, W) per sample", paper="Ba, Kiros & Hinton 2016",
    channels_last_needs_kernels=True,
    compile_max_batch=2))
register(NormScheme(
    "in",
    lambda cfg, c, act, layer: NormAct(group_norm.InstanceNorm2d(c, eps_of(cfg), relu=act), None),
    normalizes="(H, W) per sample and channel", paper="Ulyanov, Vedaldi & Lempitsky 2016",
    channels_last_needs_kernels=True,
    compile_max_batch=32))
register(NormScheme(
    "ws_gn",
    lambda cfg, c, act, layer: NormAct(
        group_norm.GroupNorm(resolve_groups(cfg, c, layer), c, eps_of(cfg), relu=act),
        None),  # the ReLU is fused into the layer
    conv=weight_standardization.standardized_conv,
    normalizes="(C/G, H, W) per sample and group; conv weights per output filter over (C_in, kh, kw)",
    paper="Qiao et al. 2019 (WS) + Wu & He 2018 (GN)",
    channels_last_needs_kernels=True,
    compile_max_batch=8))


def _frn_act(cfg, c: int, act: bool, layer: str) -> NormAct:
    """FRN with its TLU fused into the layer (``norm.frn_activation: tlu``, the paper), or
    with a plain ReLU after it (``relu``, a control: FRN's output y, then max(y, 0)); no
    non-linearity on a block's second norm either way."""
    relu = getattr(cfg, "frn_activation", "tlu") == "relu"
    norm = filter_response.FilterResponseNorm2d(c, eps_of(cfg), cfg.learn_eps, tlu=act and not relu)
    return NormAct(norm, _relu_if(act and relu))


def _frn_post_add_act(cfg, c: int, layer: str) -> nn.Module:
    """After a residual add of an FRN network: a TLU with its own tau, or ReLU under ``relu``."""
    return relu_after_add(cfg, c, layer) if getattr(cfg, "frn_activation", "tlu") == "relu" else filter_response.TLU(c)


register(NormScheme(
    "frn",
    # TLU replaces the ReLU (fused into the layer); no TLU on a block's second norm;
    # norm.frn_activation: relu puts a plain ReLU back in both places (a control)
    _frn_act,
    post_add_act=_frn_post_add_act,  # the post-add ReLU becomes a TLU (own tau)
    normalizes="(H, W) per sample and channel, mean square, no centering", paper="Singh & Krishnan 2019",
    default_eps=1e-6, compile_max_batch=32))
register(NormScheme(
    "evonorm_s0",
    lambda cfg, c, act, layer: NormAct(evonorm.EvoNormS0(c, resolve_groups(cfg, c, layer), eps_of(cfg), act), None),
    normalizes="(C/G, H, W) per sample and group (std only), with its own sigmoid gate",
    paper="Liu, Brock, Simonyan & Le 2020",
    compile_max_batch=0))
register(NormScheme(
    "none",
    lambda cfg, c, act, layer: NormAct(nn.Identity(), _relu_if(act)),
    normalizes="nothing (identity)", paper="-",
    compile_max_batch=32))

register(NormScheme(
    "syncbn",
    lambda cfg, c, act, layer: NormAct(sync_batch_norm.SyncBatchNorm2d(c, eps_of(cfg), cfg.momentum, layer),
                                       _relu_if(act)),
    batch_dependent=True, normalizes="(global B across processes, H, W) per channel",
    paper="Ioffe & Szegedy 2015; Peng et al. 2018 (MegDet) for cross-GPU statistics"))
register(NormScheme(
    "nf",
    # The architecture is replaced (normbench.models.nf_resnet, registered in normbench.models'
    # ARCH_OVERRIDES); these pieces only matter if a plain ResNet is built with kind nf: no
    # norm, a gain-scaled ReLU.
    lambda cfg, c, act, layer: NormAct(nn.Identity(), weight_standardization.ScaledReLU() if act else None),
    post_add_act=lambda cfg, c, layer: weight_standardization.ScaledReLU(),
    conv=weight_standardization.scaled_ws_conv,
    normalizes="nothing: scaled weight standardization + variance-preserving residual scaling",
    paper="Brock, De & Smith 2021a",
    compile_max_batch=2))
