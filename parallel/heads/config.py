"""Typed configuration of a head (the `head:` section of a recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from parallel.softmax import DEFAULT_CACHE_BYTES

HEAD_TYPES = ("full", "partial", "mutual", "dcq", "f2c")
MARGIN_GRADS = ("exact", "straight_through")
UPDATE_MODES = ("sparse", "dense")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
STORAGE_DTYPES = ("float32", "bfloat16", "float64")
MOMENTUM_DTYPES = ("float32", "bfloat16", "int8", "float64")
ROUNDINGS = ("stochastic", "nearest")


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
    momentum_dtype: str = "float32"     # float32 | bfloat16 | int8 (per-row absmax scale)
    rounding: str = "stochastic"        # how updated rows are written back into bfloat16 storage
    weight_decay: float = 5e-4
    update: str = "sparse"


QUEUE_UPDATES = ("score", "fifo")
INTERACTIONS = ("none", "refresh", "pull", "dual")


@dataclass
class MutualConfig:
    """MutualFace options, read from `head.extra` of a `mutual` head.

    Hard queue: per class, `queue_size` (Q) global ids of hard negative classes, kept by the class's
    owner. After each step every rank sends, per row, its `top_h` highest-cosine active negatives to
    the owner of the row's class, which merges them: `score` keeps the Q best by score
    (1 + cos) / 2, every stored score multiplied by `decay` at each merge into that class;
    `fifo` keeps the Q most recently seen distinct ids (a re-seen id moves to the front).
    Selection activates queued negatives after the positives, at most `hard_share` of the
    floor(rho * C_r) active rows, then random fill.

    `interaction`: `none`; `refresh` (M1: after the step W_c <- |W_c| * normalize((1 - alpha) W^_c
    + alpha * mean x^ of class c), alpha = `refresh_alpha`); `pull` (M2: extra loss
    `pull_weight` * mean(1 - cos(x_i, W_yi)), gradient to both); `dual` (M3: CE with centers detached
    on the hard-negative set for the features, CE with features detached on an independent uniform
    set for the centers; only the center view's rows have a gradient, and only they are stepped).
    """

    queue_size: int = 16
    top_h: int = 4
    hard_share: float = 0.25
    update: str = "score"
    decay: float = 0.9
    interaction: str = "refresh"
    refresh_alpha: float = 0.1
    pull_weight: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict, prefix: str = "head.extra") -> "MutualConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"{prefix}.{unknown[0]}: unknown key for a mutual head; known: {', '.join(sorted(known))}")
        cfg = cls(**extra)
        cfg.validate(prefix)
        return cfg

    def validate(self, prefix: str = "head.extra") -> None:
        if self.update not in QUEUE_UPDATES:
            raise ValueError(f"{prefix}.update: {self.update!r} is not one of {', '.join(QUEUE_UPDATES)}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"{prefix}.interaction: {self.interaction!r} is not one of {', '.join(INTERACTIONS)}")
        for key in ("queue_size", "top_h"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}.{key}: {value!r} must be an integer >= 1")
        for key, lo, hi in (("hard_share", 0.0, 1.0), ("decay", 0.0, 1.0), ("refresh_alpha", 0.0, 1.0)):
            value = getattr(self, key)
            if not lo <= value <= hi:
                raise ValueError(f"{prefix}.{key}: {value} must be within [{lo}, {hi}]")
        if self.pull_weight < 0:
            raise ValueError(f"{prefix}.pull_weight: {self.pull_weight} must be >= 0")


EMA_HEAD_LAYOUTS = ("sharded", "replicated")
EVAL_NETWORKS = ("ema", "backbone")


def _extra_section(cls, extra: dict, prefix: str, kind: str):
    """Builds a typed options dataclass from `head.extra`; a `margin` entry becomes a MarginConfig."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown key for a {kind} head; known: {', '.join(sorted(known))}")
    values = dict(extra)
    if "margin" in values:
        margin = values["margin"]
        if isinstance(margin, dict):
            margin_known = {f.name for f in fields(MarginConfig)}
            bad = sorted(set(margin) - margin_known)
            if bad:
                raise ValueError(f"{prefix}.margin.{bad[0]}: unknown key; known: {', '.join(sorted(margin_known))}")
            values["margin"] = MarginConfig(**{**vars(cls().margin), **margin})
        elif not isinstance(margin, MarginConfig):
            raise ValueError(f"{prefix}.margin: expected a mapping, got {margin!r}")
    cfg = cls(**values)
    cfg.validate(prefix)
    return cfg


def _check_margin(margin: MarginConfig, prefix: str) -> None:
    if margin.grad not in MARGIN_GRADS:
        raise ValueError(f"{prefix}.margin.grad: {margin.grad!r} is not one of {', '.join(MARGIN_GRADS)}")
    if margin.scale <= 0 or margin.m1 <= 0:
        raise ValueError(f"{prefix}.margin: scale ({margin.scale}) and m1 ({margin.m1}) must be > 0")


@dataclass
class DcqConfig:
    """DCQ options, read from `head.extra` of a `dcq` head (official values as defaults).

    `queue_size` K: keys in the queue over all ranks, a multiple of the global batch Bg (checked at
    the first step). `momentum` mu: the weight generator g is the EMA of the trained network,
    g <- mu g + (1 - mu) f, updated before the keys are computed. `margin`: CosFace s=50, m=0.3 (the
    head's margin; `head.margin` is not used by dcq). `layout`: `sharded` (each rank keeps a ring of
    its own last K/W keys; no key crosses the network) or `replicated` (every rank keeps all K keys,
    the gathered keys are enqueued everywhere; the official layout). `eval_network`: `ema`
    (evaluate the weight generator g, as the paper does) or `backbone` (the trained f).
    """

    queue_size: int = 8192
    momentum: float = 0.999
    margin: MarginConfig = field(default_factory=lambda: MarginConfig(m1=1.0, m2=0.0, m3=0.3, scale=50.0))
    layout: str = "sharded"
    eval_network: str = "ema"

    @classmethod
    def from_extra(cls, extra: dict, prefix: str = "head.extra") -> "DcqConfig":
        return _extra_section(cls, extra, prefix, "dcq")

    def validate(self, prefix: str = "head.extra") -> None:
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"{prefix}.queue_size: {self.queue_size!r} must be an integer >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{prefix}.momentum: {self.momentum} must be within [0, 1)")
        if self.layout not in EMA_HEAD_LAYOUTS:
            raise ValueError(f"{prefix}.layout: {self.layout!r} is not one of {', '.join(EMA_HEAD_LAYOUTS)}")
        if self.eval_network not in EVAL_NETWORKS:
            raise ValueError(f"{prefix}.eval_network: {self.eval_network!r} is not one of {', '.join(EVAL_NETWORKS)}")
        _check_margin(self.margin, prefix)


@dataclass
class F2cConfig:
    """F2C options, read from `head.extra` of an `f2c` head (official values as defaults).

    `pool_size` K: slots of the dynamic class pool over all ranks, K >= 1.5 * (gallery rows of one
    direction over all ranks) (checked at the first step); each rank owns about K/W slots for the
    identities it owns. `momentum` alpha: the gallery net G is the EMA of the probe net P.
    `margin`: ArcFace s=32, m=0.5 (`head.margin` is not used by f2c). `num_hard` h of the outlier
    loss, 0 for the paper's clip(floor(0.0002 K), 3, 10). `eval_network`: `backbone` (the probe net,
    as the paper does) or `ema` (the gallery net).
    """

    pool_size: int = 16384
    momentum: float = 0.99
    margin: MarginConfig = field(default_factory=lambda: MarginConfig(m1=1.0, m2=0.5, m3=0.0, scale=32.0))
    num_hard: int = 0
    eval_network: str = "backbone"

    @classmethod
    def from_extra(cls, extra: dict, prefix: str = "head.extra") -> "F2cConfig":
        return _extra_section(cls, extra, prefix, "f2c")

    @property
    def hard_count(self) -> int:
        return self.num_hard if self.num_hard > 0 else min(max(int(0.0002 * self.pool_size), 3), 10)

    def validate(self, prefix: str = "head.extra") -> None:
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ValueError(f"{prefix}.pool_size: {self.pool_size!r} must be an integer >= 1")
        if not isinstance(self.num_hard, int) or self.num_hard < 0:
            raise ValueError(f"{prefix}.num_hard: {self.num_hard!r} must be an integer >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{prefix}.momentum: {self.momentum} must be within [0, 1)")
        if self.eval_network not in EVAL_NETWORKS:
            raise ValueError(f"{prefix}.eval_network: {self.eval_network!r} is not one of {', '.join(EVAL_NETWORKS)}")
        _check_margin(self.margin, prefix)


@dataclass
class HeadConfig:
    type: str = "partial"
    sample_rate: float = 0.1            # rho: share of local classes active per step (partial, mutual)
    margin: MarginConfig = field(default_factory=MarginConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    chunk_size: int = 8192              # classes per chunk of the fused softmax; results do not depend on it
    logit_cache_mib: int = DEFAULT_CACHE_BYTES >> 20  # pass-1 logits kept for pass 2 (skips their GEMM); same results
    compute_dtype: str = "float32"      # GEMM dtype; softmax math is always float32 (float64 if compute is)
    storage_dtype: str = "float32"      # dtype of the center rows and momentum
    init_std: float = 0.01
    seed: int = 0
    extra: dict = field(default_factory=dict)  # method-specific options (mutual, dcq, f2c)

    @property
    def logit_cache_bytes(self) -> int:
        return self.logit_cache_mib << 20

    def validate(self, prefix: str = "head") -> None:
        def check(key, value, allowed):
            if value not in allowed:
                raise ValueError(f"{prefix}.{key}: {value!r} is not one of {', '.join(allowed)}")

        check("type", self.type, HEAD_TYPES)
        check("margin.grad", self.margin.grad, MARGIN_GRADS)
        check("optimizer.update", self.optimizer.update, UPDATE_MODES)
        check("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        check("optimizer.momentum_dtype", self.optimizer.momentum_dtype, MOMENTUM_DTYPES)
        check("optimizer.rounding", self.optimizer.rounding, ROUNDINGS)
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"{prefix}.sample_rate: {self.sample_rate} must be within [0, 1]")
        if self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size: {self.chunk_size} must be >= 1")
        if not isinstance(self.logit_cache_mib, int) or self.logit_cache_mib < 0:
            raise ValueError(f"{prefix}.logit_cache_mib: {self.logit_cache_mib!r} must be an integer >= 0")
        if self.margin.scale <= 0:
            raise ValueError(f"{prefix}.margin.scale: {self.margin.scale} must be > 0")
        if self.margin.m1 <= 0:
            raise ValueError(f"{prefix}.margin.m1: {self.margin.m1} must be > 0")
        if self.type == "mutual":
            MutualConfig.from_extra(self.extra, f"{prefix}.extra")
        if self.type in ("dcq", "f2c"):
            (DcqConfig if self.type == "dcq" else F2cConfig).from_extra(self.extra, f"{prefix}.extra")
            if self.margin != MarginConfig():
                raise ValueError(f"{prefix}.margin is not used by a {self.type} head: set {prefix}.extra.margin")
