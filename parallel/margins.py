"""Margins on the target logit: cos(m1*theta + m2) - m3, times the scale s.

ArcFace = (1, m, 0), CosFace = (1, 0, m), SphereFace-like m1 > 1 and any combination in between
(insightface's combined-margin space).

Gradient modes:
- `exact`: the true derivative of the margin function. Where m1*theta + m2 would pass pi the target
  logit falls back to cos - m3 - m2*sin(m2) (insightface's ArcFace guard, which keeps the target
  logit decreasing in theta), with derivative 1.
- `straight_through`: the forward value cos(m1*acos(cos) + m2) - m3 without a guard, the backward as
  if the margin were a constant shift (derivative 1), as arcface_torch's CombinedMarginLoss computes
  it under no_grad. Needed to reproduce its numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Margin:
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    scale: float = 64.0
    grad: str = "exact"
    interclass_filter: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Margin":
        return cls(cfg.m1, cfg.m2, cfg.m3, cfg.scale, cfg.grad, cfg.interclass_filter)

    @property
    def is_additive_only(self) -> bool:
        """CosFace-type margin: cos - m3, no angle involved."""
        return self.m1 == 1.0 and self.m2 == 0.0

    @property
    def max_logit(self) -> float:
        """No logit exceeds this (cosines are clamped to [-1, 1] and margins only lower the target)."""
        return self.scale * max(1.0, 1.0 - self.m3)

    def target(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos (N,) of each row's target column -> (psi (N,), dpsi/dcos (N,)) before scaling."""
        if self.is_additive_only:
            return cos - self.m3, torch.ones_like(cos)
        theta = torch.acos(cos)
        angle = self.m1 * theta + self.m2
        psi = torch.cos(angle) - self.m3
        if self.grad == "straight_through":
            return psi, torch.ones_like(cos)
        sin_theta = torch.sqrt(torch.clamp(1.0 - cos * cos, min=torch.finfo(cos.dtype).tiny))
        dpsi = self.m1 * torch.sin(angle) / sin_theta
        within = angle <= math.pi
        fallback = cos - self.m3 - self.m2 * math.sin(self.m2)
        psi = torch.where(within, psi, fallback)
        dpsi = torch.where(within, dpsi, torch.ones_like(dpsi))
        return psi, dpsi
