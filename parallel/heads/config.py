"""Typed configuration of a head (the `head:` section of a recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field

HEAD_TYPES = ("full", "partial", "mutual", "dcq", "f2c")
MARGIN_GRADS = ("exact", "straight_through")
UPDATE_MODES = ("sparse", "dense")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
STORAGE_DTYPES = ("float32", "bfloat16", "float64")


@dataclass
class MarginConfig:
    """Combined margin cos(m1*theta + m2) - m3 on the target logit, times `scale`.

    ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4). `grad`: `exact` differentiates the margin;
    `straight_through` passes the gradient as if the margin were a constant shift (arcface_torch).
    `interclass_filter` > 0 zeroes negative cosines above it (no gradient): label-noise robustness.
    """

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    scale: float = 64.0
    grad: str = "exact"
    interclass_filter: float = 0.0


@dataclass
class OptimizerConfig:
    """SGD with momentum for the head's rows. `update`: `sparse` touches only the rows active this step
    (their momentum included); `dense` applies momentum and weight decay to every row (arcface_torch v2)."""

    momentum: float = 0.9
    weight_decay: float = 5e-4
    update: str = "sparse"


@dataclass
class HeadConfig:
    type: str = "partial"
    sample_rate: float = 0.1            # rho: share of local classes active per step (partial, mutual)
    margin: MarginConfig = field(default_factory=MarginConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    chunk_size: int = 8192              # classes per chunk of the fused softmax; results do not depend on it
    compute_dtype: str = "float32"      # GEMM dtype; softmax math is always float32 (float64 if compute is)
    storage_dtype: str = "float32"      # dtype of the center rows and momentum
    init_std: float = 0.01
    seed: int = 0
    extra: dict = field(default_factory=dict)  # method-specific options (mutual, dcq, f2c)

    def validate(self, prefix: str = "head") -> None:
        def check(key, value, allowed):
            if value not in allowed:
                raise ValueError(f"{prefix}.{key}: {value!r} is not one of {', '.join(allowed)}")

        check("type", self.type, HEAD_TYPES)
        check("margin.grad", self.margin.grad, MARGIN_GRADS)
        check("optimizer.update", self.optimizer.update, UPDATE_MODES)
        check("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"{prefix}.sample_rate: {self.sample_rate} must be within [0, 1]")
        if self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size: {self.chunk_size} must be >= 1")
        if self.margin.scale <= 0:
            raise ValueError(f"{prefix}.margin.scale: {self.margin.scale} must be > 0")
        if self.margin.m1 <= 0:
            raise ValueError(f"{prefix}.margin.m1: {self.margin.m1} must be > 0")
