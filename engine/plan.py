"""Memory planner: bytes per rank of every component of a training step, and the largest number of
classes that fits a memory budget.

The head terms follow the code: parallel/bank.py (rows, momentum, int8 scales), parallel/softmax.py
(active rows as a float32 leaf, bfloat16 with bfloat16 storage, and their gradient formed in the forward,
logit chunks), parallel/heads/sampling.py (one float32 priority per local class) and the heads'
queues. Backbone activations are measured, not guessed: a batch-2 forward on the meta device with
saved-tensor hooks counts exactly what autograd keeps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from parallel.bank import DTYPES, update_workspace_bytes
from parallel.heads.config import DcqConfig, F2cConfig, MutualConfig
from parallel.softmax import DEFAULT_CACHE_BYTES

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
# Resident bytes of a rank before anything of the step exists. A benchmark rank (torch imported, gloo up)
# measured 222-236 MiB; a training rank also imports DeepSpeed, the data loader and the metrics server,
# hence the larger default. `process_baseline` takes the figure of your own launcher.
PROCESS_BASELINE = 360 * 2**20
LOGIT_TEMPORARIES = 6            # (Bg, chunk) float32 tensors alive at once inside a softmax chunk


@dataclass
class PlanInput:
    classes: int
    dim: int = 512
    world: int = 2
    sample_rate: float = 0.1
    batch: int = 128                 # per rank
    head: str = "partial"
    storage_dtype: str = "float32"
    compute_dtype: str = "float32"
    momentum_dtype: str = "float32"
    update: str = "sparse"
    chunk_size: int = 8192
    logit_cache_mib: int = DEFAULT_CACHE_BYTES >> 20  # head.logit_cache_mib
    queue_size: int = MutualConfig.queue_size   # mutual: Q
    dcq_queue: int = DcqConfig.queue_size       # dcq: K (global)
    f2c_pool: int = F2cConfig.pool_size         # f2c: K slots (global)
    backbone: str | None = None
    backbone_optimizer: str = "sgd"  # sgd (momentum) | adamw
    zero_stage: int = 0
    mixed_precision: str = "float32"
    process_baseline: int = PROCESS_BASELINE


@dataclass
class Plan:
    inputs: PlanInput
    components: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict:
        return dict(inputs=asdict(self.inputs), components=self.components, total_bytes=self.total)


def local_classes(classes: int, world: int) -> int:
    return math.ceil(classes / world)


def head_bytes(p: PlanInput) -> dict:
    c_r = local_classes(p.classes, p.world)
    bg = p.batch * p.world
    d = p.dim
    out = {}
    if p.head in ("full", "partial", "mutual"):
        active = c_r if p.head == "full" else max(int(p.sample_rate * c_r), min(bg, c_r))
        out["head_rows"] = c_r * d * BYTES[p.storage_dtype]
        mom = c_r * d * BYTES[p.momentum_dtype] + (4 * c_r if p.momentum_dtype == "int8" else 0)
        out["head_optimizer_state"] = mom
        every_row = p.head == "full" or (p.head == "partial" and int(p.sample_rate * c_r) >= c_r)
        # one float32 draw per class, its copy with a spare slot, the positives mask
        out["head_sampling"] = 0 if every_row else 9 * c_r
        # active rows (the leaf) and their gradient (formed in forward, handed to the leaf in backward):
        # float32, or bfloat16 in the lean mode (bfloat16 storage). full / partial: one tensor, the
        # bank's own with every row active (the gradient is the extra one), else the copy of the rows
        # that the gradient replaces chunk by chunk (plus one chunk's float32 U beside it when the
        # GEMMs are float32); mutual keeps its leaf and gradient apart
        leaf = 2 if p.storage_dtype == "bfloat16" else 4
        out["head_active_rows_and_grads"] = (2 if p.head == "mutual" else 1) * active * d * leaf
        if p.head != "mutual" and not every_row and p.storage_dtype != "bfloat16" and p.compute_dtype == "float32":
            out["head_active_rows_and_grads"] += min(p.chunk_size, active) * d * 4
        # the optimizer step works in blocks of rows (dense mode: of every row, each block once)
        out["head_update_workspace"] = update_workspace_bytes(
            c_r if p.update == "dense" else active, d, DTYPES[p.storage_dtype], DTYPES[p.momentum_dtype])
        if p.head == "mutual":
            out["head_queues"] = 8 * c_r * p.queue_size
        chunk = min(p.chunk_size, active)
    elif p.head == "dcq":
        slots = math.ceil(p.dcq_queue / p.world)
        out["head_queues"] = slots * (d * 4 + 8)
        chunk = min(p.chunk_size, slots)
    elif p.head == "f2c":
        slots = math.ceil(p.f2c_pool / p.world)
        out["head_queues"] = (slots + 1) * 2 * d * BYTES[p.storage_dtype] + 24 * slots   # + a scratch slot
        # a direction's two views of the pool (every slot, plus the scratch slot) and the float32
        # normalized view of the outlier search
        out["head_pool_views"] = 2 * (slots + 1) * d * BYTES[p.storage_dtype] + slots * d * 4
        chunk = min(p.chunk_size, slots)
    else:
        raise ValueError(f"head: {p.head!r} is not one of full, partial, mutual, dcq, f2c")
    out["head_logits_chunk"] = LOGIT_TEMPORARIES * bg * chunk * 4
    # pass-1 logits kept for pass 2 (parallel/softmax.py), beyond the chunk at hand
    columns = active if p.head in ("full", "partial", "mutual") else slots
    out["head_logit_cache"] = min(p.logit_cache_mib << 20, bg * max(0, columns - chunk) * 4)
    out["head_gathered_embeddings"] = 4 * bg * d * 4
    return out


def activation_bytes_per_sample(backbone: str, dim: int) -> int:
    """Bytes autograd saves for one 112x112 sample: a batch-2 forward on the meta device."""
    from models import build_backbone
    with torch.device("meta"):
        model = build_backbone(backbone, embedding_size=dim)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(2, 3, 112, 112, device="meta"))  # batch norm needs two samples
    return sum(saved) // 2


def backbone_bytes(p: PlanInput) -> dict:
    if not p.backbone:
        return {}
    from models import build_backbone
    with torch.device("meta"):
        params = sum(t.numel() for t in build_backbone(p.backbone, embedding_size=p.dim).parameters())
    state_per_param = 4 if p.backbone_optimizer == "sgd" else 8
    if p.mixed_precision != "float32":
        state_per_param += 4  # fp32 master weights
    shard = p.world
    weights = params * 4 / (shard if p.zero_stage >= 3 else 1)
    grads = params * 4 / (shard if p.zero_stage >= 2 else 1)
    state = params * state_per_param / (shard if p.zero_stage >= 1 else 1)
    return {"backbone_weights": int(weights), "backbone_grads": int(grads), "backbone_optimizer_state": int(state),
            # counted in float32; bfloat16/float16 autocast saves half-size activations
            "backbone_activations": activation_bytes_per_sample(p.backbone, p.dim) * p.batch
            // (2 if p.mixed_precision != "float32" else 1)}


def plan(p: PlanInput) -> Plan:
    components = {"process_baseline": p.process_baseline}
    components.update(head_bytes(p))
    components.update(backbone_bytes(p))
    return Plan(p, components)


def largest_classes(p: PlanInput, budget_bytes: int) -> int:
    """Largest C whose plan fits `budget_bytes` per rank (bisection; the plan grows with C)."""
    lo, hi = 0, 1
    while plan(_with(p, hi)).total <= budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return lo
    while hi - lo > max(1, lo // 10_000):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(_with(p, mid)).total <= budget_bytes else (lo, mid)
    return lo


def _with(p: PlanInput, classes: int) -> PlanInput:
    return PlanInput(**{**asdict(p), "classes": classes})
