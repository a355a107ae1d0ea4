"""Packing: K networks that differ only in seed become one grouped network, and back.

At small batch a CPU step is mostly fixed per-step overhead, so K small models run one after
another waste most of the machine. Packing turns K identical-architecture models into one
network whose every convolution is grouped (member k owns group k), every per-channel norm
has K x C channels (GroupNorm K x G groups) and the classifier is a batched matmul. Member
k's input is its own batch in channels 3k..3k+2; its loss is its own cross-entropy; the
packed loss is their sum, so each member's gradient is exactly its own. SGD, momentum and
weight decay act element-wise, so a packed member follows the same trajectory as the same
run trained alone (up to float rounding from different kernel blocking).

Packable: the schemes whose layers are per-channel or grouped (bn, ghost_bn, gn, ln, in,
frn without learned eps, none) with clip modes none and norm, in float32 (no ``train.amp``),
eager (``train.compile`` auto or none: a run alone may compile, a packed network does not;
its members' summaries say ``compiled: null``), and neither the lr-mode
landscape probe nor activation histograms (both read each training step's own batch and
gradient); :func:`why_not_packable` says why a config is not. The training of packed runs is
:mod:`normbench.training.packed`.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import RunConfig
from normbench.errors import UserError

PACKABLE_CLIP = ("none", "norm")


# ----------------------------------------------------------------------------- layers


class PackedShortcutA(nn.Module):
    """Option-A shortcut for K members: subsample, zero-pad each member's channels."""

    def __init__(self, members: int, pad: int, stride: int):
        super().__init__()
        self.members, self.pad, self.stride = members, pad, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            b, kc, h, w = x.shape
            x = F.pad(x.reshape(b, self.members, kc // self.members, h, w), (0, 0, 0, 0, 0, self.pad))
            x = x.reshape(b, -1, h, w)
        return x


class PackedLinear(nn.Module):
    """K independent linear layers: (B, K*in) -> (B, K, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, out, in)
        self.bias = nn.Parameter(bias)  # (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out, inp = self.weight.shape
        return torch.baddbmm(self.bias.unsqueeze(1), x.reshape(-1, k, inp).transpose(0, 1),
                             self.weight.transpose(1, 2)).transpose(0, 1)


def _cat_param(ps: list[torch.Tensor], dim: int = 0) -> nn.Parameter:
    return nn.Parameter(torch.cat([p.detach() for p in ps], dim))


def per_channel_size(module: nn.Module) -> Optional[int]:
    """C when the module is per-channel (``num_features``, or only 1-D parameters of one length)."""
    if hasattr(module, "num_features"):
        return int(module.num_features)
    sizes = {tuple(p.shape) for p in module.parameters(recurse=False)}
    if len(sizes) == 1 and len(next(iter(sizes))) == 1 and not list(module.buffers(recurse=False)):
        return next(iter(sizes))[0]
    return None


def _pack_leaf(mods: list[nn.Module], name: str) -> nn.Module:
    from normbench.models.resnet import ShortcutA

    first, k = mods[0], len(mods)
    if type(first) is nn.Conv2d:
        conv = nn.Conv2d(first.in_channels * k, first.out_channels * k, first.kernel_size, first.stride,
                         first.padding, groups=first.groups * k, bias=first.bias is not None)
        conv.weight = _cat_param([m.weight for m in mods])
        if first.bias is not None:
            conv.bias = _cat_param([m.bias for m in mods])
        return conv
    if isinstance(first, nn.GroupNorm):  # (normbench's GroupNorm keeps its fused ReLU)
        from normbench.norms.group_norm import GroupNorm

        gn = GroupNorm(first.num_groups * k, first.num_channels * k, first.eps, first.affine,
                       relu=getattr(first, "relu", False))
        if first.affine:
            gn.weight, gn.bias = _cat_param([m.weight for m in mods]), _cat_param([m.bias for m in mods])
        return gn
    if isinstance(first, ShortcutA):
        return PackedShortcutA(k, first.pad, first.stride)
    if isinstance(first, nn.Linear):
        return PackedLinear(torch.stack([m.weight.detach() for m in mods]), torch.stack([m.bias.detach() for m in mods]))
    if isinstance(first, (nn.ReLU, nn.Identity)):
        return first
    c = per_channel_size(first)
    if c is not None:  # per-channel layers: BN, Ghost BN, FRN, TLU
        packed = copy.deepcopy(first)
        if hasattr(first, "num_features"):
            packed.num_features = c * k
        for pname, p in first.named_parameters(recurse=False):
            if p.ndim != 1 or p.shape[0] != c:
                raise UserError(f"cannot pack layer {name} ({type(first).__name__}): parameter {pname} is not per-channel")
            setattr(packed, pname, _cat_param([getattr(m, pname) for m in mods]))
        for bname, b in first.named_buffers(recurse=False):
            if b is None:
                continue
            if b.ndim == 1 and b.shape[0] == c:
                packed._buffers[bname] = torch.cat([getattr(m, bname) for m in mods])
            elif b.ndim == 0:
                packed._buffers[bname] = b.clone()
            else:
                raise UserError(f"cannot pack layer {name} ({type(first).__name__}): buffer {bname}")
        return packed
    raise UserError(f"cannot pack layer {name} ({type(first).__name__})")


def pack_models(models: list[nn.Module]) -> nn.Module:
    """One network computing all ``models`` at once (same architecture, any weights)."""
    packed = copy.deepcopy(models[0])

    def walk(dst: nn.Module, srcs: list[nn.Module], prefix: str) -> None:
        for child_name, child in list(dst.named_children()):
            subs = [getattr(s, child_name) for s in srcs]
            full = f"{prefix}{child_name}"
            if len(list(child.children())) == 0:
                setattr(dst, child_name, _pack_leaf(subs, full))
            else:
                walk(child, subs, full + ".")
        own = [n for n, _ in dst.named_parameters(recurse=False)]
        if own:
            raise UserError(f"cannot pack module {prefix or 'model'} ({type(dst).__name__}): it holds parameters")

    walk(packed, models, "")
    return packed


def unpack_tensor(packed: torch.Tensor, like: torch.Tensor, k: int, members: int) -> torch.Tensor:
    """Member k's slice of a packed tensor, shaped like the solo tensor ``like``."""
    if packed.ndim == 0:
        return packed.clone()
    return packed.chunk(members, 0)[k].reshape(like.shape).clone()


def unpack_state(packed_state: dict, solo_state: dict, k: int, members: int) -> dict:
    return {name: unpack_tensor(packed_state[name], solo_state[name], k, members) for name in solo_state}


# ----------------------------------------------------------------------------- eligibility


def why_not_packable(cfg: RunConfig) -> Optional[str]:
    """None when ``cfg`` can be packed, else the reason."""
    if cfg.norm.kind not in ("bn", "ghost_bn", "gn", "ln", "in", "frn", "none"):
        return f"norm '{cfg.norm.kind}' has layers that packing does not support"
    if cfg.norm.kind == "frn" and cfg.norm.learn_eps:
        return "frn with learn_eps has a per-layer scalar"
    if cfg.clip.mode not in PACKABLE_CLIP:
        return f"clip mode '{cfg.clip.mode}' is not per-member yet"
    if cfg.train.amp != "none":
        return f"train.amp={cfg.train.amp}: a packed network trains in float32"
    if cfg.train.compile not in ("auto", "none"):
        return f"train.compile={cfg.train.compile}: a packed network trains eager"
    a = cfg.analysis
    if a.probe and a.probe_mode != "fixed":
        return "the lr-mode landscape probe reads each training step's own gradient (probe_mode fixed packs)"
    if a.hist_every:
        return "activation histograms read each training step's own batch"
    return None


def pack_key(cfg: RunConfig) -> str:
    """Cells with the same key differ only in seed (and name) and may be packed together."""
    body = cfg.to_dict()
    body.pop("seed")
    body.pop("name")
    return RunConfig.model_validate(body).config_hash()


