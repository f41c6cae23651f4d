"""MobileFaceNet for 112x112 faces.

Parameter names and shapes follow insightface's arcface_torch `mobilefacenet.py` (`mbf`: stage
blocks (1, 4, 6, 2), width scale 2; `mbf_large`: (2, 8, 12, 4), scale 4), so its published weights
load with `load_state_dict(strict=True)`:

    layers.{0..7}   stem conv, second conv (or residual stage), then 3 x (down-sampling
                    depthwise unit, residual stage)
    conv_sep        1x1 conv to 512 channels
    features        GDC: 7x7 depthwise conv + BN -> flatten -> linear -> BatchNorm1d

Every conv unit keeps its modules in a `.layers` Sequential (conv, BN[, PReLU]); that nesting is
what the parameter names encode.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import body_autocast, run_segment


class ConvUnit(nn.Module):
    """conv -> BN -> PReLU, or conv -> BN when `activation` is False (a linear bottleneck)."""

    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, activation=True):
        super().__init__()
        parts = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                 nn.BatchNorm2d(cout)]
        if activation:
            parts.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*parts)

    def forward(self, x):
        return self.layers(x)


class DepthwiseUnit(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden` -> 3x3 depthwise (stride) -> 1x1 linear project,
    with an identity shortcut when `residual`."""

    def __init__(self, cin, cout, hidden, stride=1, residual=False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(cin, hidden),
            ConvUnit(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            ConvUnit(hidden, cout, activation=False),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStage(nn.Module):
    """`depth` residual depthwise units at constant width; checkpointed unit by unit when asked."""

    def __init__(self, channels, depth, hidden):
        super().__init__()
        self.layers = nn.Sequential(*[DepthwiseUnit(channels, channels, hidden, residual=True)
                                      for _ in range(depth)])
        self.gradient_checkpointing = False

    def forward(self, x):
        for unit in self.layers:
            x = run_segment(unit, x, self.gradient_checkpointing)
        return x


class Flatten(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


class GlobalDepthwiseEmbedding(nn.Module):
    """GDC: a 7x7 depthwise conv pools the (512, 7, 7) map to 512 values, then linear -> BatchNorm1d."""

    def __init__(self, channels, embedding_size, dropout=0.0):
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(channels, channels, kernel=7, groups=channels, activation=False),
            Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        pool, flatten, linear, norm = self.layers
        return norm(linear(self.dropout(flatten(pool(x)))))


class MobileFaceNet(nn.Module):
    """(N, 3, 112, 112) float in [-1, 1] -> (N, embedding_size)."""

    def __init__(
        self,
        depths: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"MobileFaceNet needs 4 stage depths, got {list(depths)}")
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        second = (ConvUnit(c1, c1, kernel=3, padding=1, groups=64) if depths[0] == 1
                  else ResidualStage(c1, depths[0], hidden=128))
        self.layers = nn.ModuleList([
            ConvUnit(3, c1, kernel=3, stride=2, padding=1),          # 112 -> 56
            second,
            DepthwiseUnit(c1, c1, hidden=128, stride=2),             # 56 -> 28
            ResidualStage(c1, depths[1], hidden=128),
            DepthwiseUnit(c1, c2, hidden=256, stride=2),             # 28 -> 14
            ResidualStage(c2, depths[2], hidden=256),
            DepthwiseUnit(c2, c2, hidden=512, stride=2),             # 14 -> 7
            ResidualStage(c2, depths[3], hidden=256),
        ])
        for m in self.layers:
            if isinstance(m, ResidualStage):
                m.gradient_checkpointing = gradient_checkpointing
        self.conv_sep = ConvUnit(c2, 512)
        self.features = GlobalDepthwiseEmbedding(512, embedding_size, dropout=dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x) if isinstance(layer, ResidualStage) else run_segment(
                    layer, x, self.gradient_checkpointing)
        x = self.conv_sep(x.to(self.conv_sep.layers[0].weight.dtype))
        return self.features(x)
