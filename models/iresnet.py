"""Improved ResNet (IResNet) for 112x112 faces.

Parameter names and shapes follow the layout of insightface's arcface_torch `iresnet.py`, so its
published `r18 ... r200` weights load with `load_state_dict(strict=True)` and give the same embeddings:

    conv1, bn1, prelu                        stem: 3x3 conv (stride 1) -> BN -> PReLU
    layer{1..4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3}, layer{k}.0.downsample.{0 conv1x1, 1 BN}
    bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d, weight fixed at 1)

Each stage halves the resolution in its first block (stride on the second 3x3 conv); the block is
BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the (projected) shortcut. `tiny` is the same
design with narrow stages and a stride-2 stem for quick CPU runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import body_autocast, conv_output_size, run_segment


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """(N, 3, S, S) float in [-1, 1] -> (N, embedding_size).

    depths: blocks per stage; widths: channels per stage; stem_stride 1 for the standard layout
    (112 -> 56 -> 28 -> 14 -> 7), 2 for a quick variant. `fp16` runs the body under autocast in the
    device's fast half type and the embedding layers in float32; `gradient_checkpointing` recomputes
    each block's activations in backward instead of storing them.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        stem_stride: int = 1,
        embedding_size: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
        input_size: int = 112,
    ):
        super().__init__()
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got depths={list(depths)} widths={list(widths)}")
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.embedding_size = embedding_size
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=1e-5)
        self.prelu = nn.PReLU(stem_width)
        size = conv_output_size(input_size, 3, stem_stride, 1)
        cin = stem_width
        for index, (depth, width) in enumerate(zip(depths, widths), start=1):
            blocks = [IBasicBlock(cin, width, stride=2)] + [IBasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            size = conv_output_size(size, 3, 2, 1)
            cin = width
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * size * size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # arcface_torch keeps the output BatchNorm's scale fixed at 1 (only its shift is learned).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with body_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in self.stages():
                for block in stage:
                    x = run_segment(block, x, self.gradient_checkpointing)
            x = self.bn2(x)
            x = torch.flatten(x, 1)   # (N, C*h*w) in NCHW order, whatever the memory format
            x = self.dropout(x)
        x = self.fc(x.to(self.fc.weight.dtype))
        return self.features(x)


IRESNET_DEPTHS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


def iresnet(depth: int, embedding_size: int = 512, **options) -> IResNet:
    return IResNet(IRESNET_DEPTHS[depth], embedding_size=embedding_size, **options)


def iresnet_tiny(embedding_size: int = 512, **options) -> IResNet:
    """A quick IResNet for CPU demos and tests: stride-2 stem, stages of 16/32/64/128 channels with one
    block each (112 -> 56 -> 28 -> 14 -> 7 -> 4)."""
    options.setdefault("depths", (1, 1, 1, 1))
    return IResNet(widths=(16, 32, 64, 128), stem_width=16, stem_stride=2,
                   embedding_size=embedding_size, **options)
