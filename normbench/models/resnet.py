"""CIFAR ResNet-{20,32,44,56,110} (He, Zhang, Ren & Sun 2016, Sec. 4.2).

Three stages of n = (depth - 2) / 6 basic blocks at 16/32/64 channels (times ``width``),
option-A shortcuts (stride-2 subsampling and zero-padded channels: no parameters), global
average pooling and a linear classifier over 10 classes. Basic block:
``conv - norm - act - conv - norm, + shortcut, act``. The norm, its activation and the
convolution type come from the registry (normbench.norms), so this file never branches on
the scheme. ResNet-20 at width 1 has 0.27 M parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import get_scheme

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class ShortcutA(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x


class BasicBlock(nn.Module):
    def __init__(self, cfg, in_ch: int, out_ch: int, stride: int, name: str):
        super().__init__()
        scheme = get_scheme(cfg.norm.kind)
        self.conv1 = scheme.conv(cfg.norm, in_ch, out_ch, 3, stride)
        self.norm_act1 = scheme.norm_act(cfg.norm, out_ch, True, f"{name}.norm1")
        self.conv2 = scheme.conv(cfg.norm, out_ch, out_ch, 3, 1)
        self.norm2 = scheme.norm_act(cfg.norm, out_ch, False, f"{name}.norm2")
        self.shortcut = ShortcutA(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()
        self.act = scheme.post_add_act(cfg.norm, out_ch, f"{name}.act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm_act1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, cfg, num_classes: int = 10):
        super().__init__()
        depth = DEPTHS[cfg.model.arch]
        blocks = (depth - 2) // 6
        widths = [max(1, round(c * cfg.model.width)) for c in (16, 32, 64)]
        scheme = get_scheme(cfg.norm.kind)
        self.stem = scheme.conv(cfg.norm, 3, widths[0], 3, 1)
        self.stem_norm_act = scheme.norm_act(cfg.norm, widths[0], True, "stem.norm")
        layers, in_ch = [], widths[0]
        for s, out_ch in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                layers.append(BasicBlock(cfg, in_ch, out_ch, stride, f"stage{s + 1}.block{b}"))
                in_ch = out_ch
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init(cfg)

    def _init(self, cfg) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.norm.zero_init_last:
            for block in self.blocks:
                weight = getattr(block.norm2.norm, "weight", None)
                if weight is not None:
                    nn.init.zeros_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_norm_act(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(cfg) -> CifarResNet:
    return CifarResNet(cfg)
