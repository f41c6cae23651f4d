"""Per-step learning-rate schedules: linear warmup, then polynomial or cosine decay to `min_lr`.

`polynomial` with power 1 is insightface arcface_torch's recipe (PolynomialLRWarmup): during warmup
lr = base * (step + 1) / warmup (so the first step already moves); afterwards lr = min + (base - min) * (1 - t) ** power with
t = (step - warmup) / (total - warmup). `cosine` uses min + (base - min) * (1 + cos(pi t)) / 2.
`step` counts optimizer steps from 0; the value returned is the lr to use for that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    kind: str                # polynomial | cosine | constant
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    power: float = 1.0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in ("polynomial", "cosine", "constant"):
            raise ValueError(f"schedule.type: {self.kind!r} is not one of polynomial, cosine, constant")
        if self.total_steps < 1:
            raise ValueError(f"schedule: total_steps {self.total_steps} must be >= 1")
        if not 0 <= self.warmup_steps < max(self.total_steps, 1) and self.warmup_steps != 0:
            raise ValueError(f"schedule: warmup_steps {self.warmup_steps} must be < total_steps {self.total_steps}")

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.kind == "polynomial":
            factor = (1.0 - t) ** self.power
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr + (self.base_lr - self.min_lr) * factor


def total_and_warmup_steps(schedule_cfg, steps_per_epoch: int) -> tuple[int, int]:
    """Resolves the schedule section (steps or epochs, warmup steps or epochs) into optimizer steps."""
    total = schedule_cfg.steps or max(1, int(round(schedule_cfg.epochs * steps_per_epoch)))
    warmup = schedule_cfg.warmup_steps or int(round(schedule_cfg.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total - 1)


def build_schedule(schedule_cfg, base_lr: float, steps_per_epoch: int) -> LRSchedule:
    total, warmup = total_and_warmup_steps(schedule_cfg, steps_per_epoch)
    return LRSchedule(kind=schedule_cfg.type, base_lr=base_lr, total_steps=total, warmup_steps=warmup,
                      power=schedule_cfg.power, min_lr=schedule_cfg.min_lr)
