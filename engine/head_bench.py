"""One head step (optionally a whole training step with a backbone) timed on W local gloo ranks,
next to a naive implementation measured the same way, with the memory planner's prediction beside
the measured peak.

The naive head is what a straightforward Partial FC does (arcface_torch's partial_fc_v2 shape): the
shard is an nn.Parameter, the active rows are taken with autograd indexing (a dense C_r x D
gradient), logits are materialized whole, the softmax goes through autograd all-reduces and
torch.optim.SGD updates every row.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from engine.launch import MALLOC_ENV, freeze_setup_objects
from engine.metrics import peak_rss_bytes, rss_bytes
from parallel.bank import initial_rows
from parallel.collectives import all_gather_rows, gather_batch
from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, OptimizerConfig
from parallel.heads.memory import synthetic_batch
from parallel.heads.sampling import sample_rows
from parallel.sharding import ClassShard
from parallel.softmax import cpu_has_native_bfloat16_gemms


class NaiveHead(torch.nn.Module):
    def __init__(self, state, num_classes, dim, sample_rate, margin: MarginConfig, seed=0):
        super().__init__()
        self.state = state
        self.shard = ClassShard(num_classes, state.head_world, state.head_rank)
        self.weight = torch.nn.Parameter(initial_rows(*self.shard.span, dim, 0.01, seed))
        self.num_sample = int(math.floor(sample_rate * self.shard.count))
        self.margin = margin
        self.gen = torch.Generator().manual_seed(seed + state.rank)

    def forward(self, x, labels):
        group = self.state.head_group
        x_global = gather_batch(x, group, grad_scale=float(self.state.data_world))
        y = all_gather_rows(labels, group)
        active = sample_rows(y, self.shard, self.num_sample, self.gen)
        w = self.weight[active.rows]                                  # autograd index: dense gradient
        logits = torch.nn.functional.linear(torch.nn.functional.normalize(x_global),
                                            torch.nn.functional.normalize(w)).clamp(-1, 1)
        rows = torch.nonzero(active.target_col >= 0).squeeze(1)
        cols = active.target_col[rows]
        m = self.margin
        target = logits[rows, cols]
        theta = torch.acos(target)
        logits = logits.index_put((rows, cols), torch.cos(m.m1 * theta + m.m2) - m.m3) * m.scale
        world = self.state.head_world
        row_max = logits.detach().max(dim=1).values
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(logits - row_max[:, None])
        denom = e.sum(1)
        if world > 1:
            denom = dist_fn.all_reduce(denom, group=group)
        prob = e / denom[:, None]
        p_target = torch.zeros(prob.shape[0], dtype=prob.dtype)
        p_target = p_target.index_put((rows,), prob[rows, cols])
        if world > 1:
            p_target = dist_fn.all_reduce(p_target, group=group)
        return -torch.log(p_target.clamp_min(1e-30)).mean()


ALLOCATOR_ENV = {
    "training": MALLOC_ENV,
    "exact": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20), "MALLOC_TOP_PAD_": "0"},
}


def _bench_rank(state, cfg: dict):
    baseline_rss = rss_bytes()  # torch imported, process group up, nothing of the step built yet
    torch.manual_seed(cfg["seed"] + state.rank)
    dtype = cfg["dtype"]
    backbone = None
    if cfg.get("backbone"):
        from models import build_backbone
        backbone = build_backbone(cfg["backbone"], embedding_size=cfg["dim"]).to(memory_format=torch.channels_last)
        backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if state.world_size > 1:  # data parallel: gradients averaged over the ranks, as in training
            backbone = torch.nn.parallel.DistributedDataParallel(backbone)
    margin = MarginConfig(m1=1.0, m2=0.5, m3=0.0, scale=64.0)
    kind = cfg["impl"]
    if kind == "naive":
        head = NaiveHead(state, cfg["classes"], cfg["dim"], cfg["sample_rate"], margin, cfg["seed"])
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        hc = HeadConfig(type=cfg["head"], sample_rate=cfg["sample_rate"], margin=margin,
                        compute_dtype=dtype, storage_dtype=cfg.get("storage_dtype", "float32"),
                        chunk_size=cfg["chunk_size"], seed=cfg["seed"],
                        optimizer=OptimizerConfig(momentum_dtype=cfg.get("momentum_dtype", "float32")))
        head = build_head(hc, state, cfg["classes"], cfg["dim"])
    b, d = cfg["batch"], cfg["dim"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 31 + state.rank)
    times = []
    active = None
    freeze_setup_objects()   # as the trainer does before its first step
    for it in range(cfg["warmup"] + cfg["steps"]):
        labels = torch.randint(0, cfg["classes"], (b,), generator=gen)
        if backbone is not None:
            images = torch.randn(b, 3, 112, 112, generator=gen).to(memory_format=torch.channels_last)
        else:
            x = torch.randn(b, d, generator=gen, requires_grad=True)
        if state.world_size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        if backbone is not None:
            x = backbone(images)
        if kind == "naive":
            loss = head(x, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            loss = head(x, labels, synthetic_batch(head, b, gen)).loss
            loss.backward()
            head.step(lr=0.1)
            active = head.last_active.num_active if hasattr(head, "last_active") else head.active_columns
        if backbone is not None:
            backbone_opt.step()
            backbone_opt.zero_grad(set_to_none=True)
        del loss, x  # as in training: nothing of this step's graph outlives it
        t = time.perf_counter() - t0
        if it >= cfg["warmup"]:
            times.append(t)
    if active is None:
        active = max(head.num_sample, 1)
    peak_rss = peak_rss_bytes()   # the steps' peak, before the matmul-peak buffers below exist
    # the step's objects go before those buffers come: both at once do not fit at the largest C (full
    # head, 3M classes: a 9 GiB head beside 4.6 GB of GEMM operands)
    head = backbone = opt = backbone_opt = labels = None
    gc.unfreeze()
    gc.collect()
    # the matmul peak: one plain GEMM of the step's shape in the same dtype, same process, with every
    # rank multiplying at the same time (as in the step: the ranks share the machine); and each rank
    # alone, the others waiting, for reference
    bg = b * state.world_size
    mm_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    xa = torch.randn(bg, d).to(mm_dtype)
    wa = torch.randn(d, active).to(mm_dtype)
    out = torch.empty(bg, active, dtype=mm_dtype)   # no allocation (and no page faults) inside the timing
    flops = 2.0 * bg * d * active

    def best_gemm_rate(repeats=5):
        torch.mm(xa, wa, out=out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(xa, wa, out=out)
            best = min(best, time.perf_counter() - t0)
        return flops / best / 1e9

    mm_peak = 0.0
    for _ in range(3):
        if state.world_size > 1:
            dist.barrier()
        mm_peak = max(mm_peak, best_gemm_rate())
    mm_alone = 0.0
    for turn in range(state.world_size):
        if state.world_size > 1:
            dist.barrier()
        if turn == state.rank:
            mm_alone = best_gemm_rate()
    if state.world_size > 1:
        dist.barrier()
    return dict(step_seconds=times, active=active, peak_rss=peak_rss, baseline_rss=baseline_rss,
                gflops_matmul_peak=mm_peak, gflops_matmul_one_rank_alone=mm_alone)


def gemm_flops_per_entry(head: str) -> float:
    """GEMM flops per (global row, column, dimension) of one head step: 6 = logits, d x and d centers
    (2 each); DCQ's queued keys take no gradient (4). F2C counts 6 on its 2 x S columns: per direction
    and view, Bg/2 probes x S slots through logits, d x and the outlier search, 2 x 2 of them."""
    return 4.0 if head == "dcq" else 6.0


def bench_config(classes, dim, batch, world, sample_rate, head="partial", dtype="float32", chunk_size=8192,
                 steps=5, warmup=2, seed=0, naive=True, storage_dtype="float32", momentum_dtype="float32",
                 backbone=None, timeout=3600.0, allocator="training") -> dict:
    """Runs ours (and the naive head) on `world` local gloo ranks; returns one JSON-able record.

    `allocator`: glibc settings of the rank processes. "training": those of training ranks
    (engine/launch.py; freed heap memory is kept for the next step, so the peak RSS includes what the
    allocator holds). "exact": every allocation of 1 MiB or more is its own mapping, returned when
    freed, so the peak RSS is the peak of live tensors (what the planner predicts). Both are fixed
    thresholds: glibc's default moves with the history of frees, and with it the peak."""
    from engine.plan import PlanInput, plan
    from parallel.local_ranks import run_ranks
    env = ALLOCATOR_ENV[allocator]
    cfg = dict(classes=classes, dim=dim, batch=batch, sample_rate=sample_rate, head=head, dtype=dtype,
               chunk_size=chunk_size, steps=steps, warmup=warmup, seed=seed, storage_dtype=storage_dtype,
               momentum_dtype=momentum_dtype, backbone=backbone)
    ours = run_ranks(_bench_rank, world, args=(dict(cfg, impl="ours"),), timeout=timeout, env=env)
    step = statistics.median(max(r["step_seconds"][i] for r in ours) for i in range(steps))
    active = ours[0]["active"]
    bg = batch * world
    record = dict(
        head=head, classes=classes, dim=dim, batch=batch, world=world, sample_rate=sample_rate, dtype=dtype,
        storage_dtype=storage_dtype, chunk_size=chunk_size, active_classes_per_rank=active,
        step_seconds_median=step, samples_per_second=bg / step,
        gflops_achieved=gemm_flops_per_entry(head) * bg * dim * active / step / 1e9,
        gflops_matmul_peak=statistics.median(r["gflops_matmul_peak"] for r in ours),
        gflops_matmul_one_rank_alone=statistics.median(r["gflops_matmul_one_rank_alone"] for r in ours),
        peak_rss_bytes_per_rank=max(r["peak_rss"] for r in ours),
        momentum_dtype=momentum_dtype, backbone=backbone, allocator=allocator,
        baseline_rss_bytes_per_rank=max(r["baseline_rss"] for r in ours),
    )
    # the planner with this machine's measured process baseline (it varies with the CPU, the libraries
    # loaded and what the launching process imported)
    predicted = plan(PlanInput(classes=classes, dim=dim, world=world, sample_rate=sample_rate, batch=batch,
                               head=head, storage_dtype=storage_dtype, compute_dtype=dtype,
                               momentum_dtype=momentum_dtype, chunk_size=chunk_size, backbone=backbone,
                               process_baseline=record["baseline_rss_bytes_per_rank"]))
    record["planned_peak_bytes_per_rank"] = predicted.total
    record["planned_components"] = predicted.components
    record["fraction_of_matmul_peak"] = record["gflops_achieved"] / record["gflops_matmul_peak"]
    record["fraction_of_one_rank_alone"] = record["gflops_achieved"] / record["gflops_matmul_one_rank_alone"]
    if naive:
        base = run_ranks(_bench_rank, world, args=(dict(cfg, impl="naive", dtype="float32"),),
                         timeout=timeout, env=env)
        nstep = statistics.median(max(r["step_seconds"][i] for r in base) for i in range(steps))
        record.update(naive_step_seconds_median=nstep,
                      naive_peak_rss_bytes_per_rank=max(r["peak_rss"] for r in base),
                      speedup_vs_naive=nstep / step)
        record["memory_ratio_vs_naive"] = record["peak_rss_bytes_per_rank"] / record["naive_peak_rss_bytes_per_rank"]
    return record


SWEEP_CLASSES = (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)
SWEEP_HEADS = ("full", "partial", "mutual", "dcq", "f2c")
NAIVE_MAX_CLASSES = 2_000_000   # the naive head runs out of memory near 2.4M classes on 2 x 24 GiB ranks


def lean_compute_dtype() -> str:
    """GEMM dtype of the lean mode: bfloat16 where the CPU multiplies it natively, else float32."""
    return "bfloat16" if cpu_has_native_bfloat16_gemms() else "float32"


def fill_steps(head: str, batch: int, world: int) -> int:
    """Steps until a DCQ queue or an F2C pool is full at its default size, so that the timed steps
    run at the steady-state width (0 for the heads whose width does not grow). F2C commits one
    direction's gallery rows per step (W * B/2), nearly all misses at large C; the owners draw those
    at random, hence a quarter more for the rank that fills last."""
    from parallel.heads.config import DcqConfig, F2cConfig
    if head == "dcq":
        return math.ceil(DcqConfig.queue_size / (batch * world))
    if head == "f2c":
        return math.ceil(1.25 * F2cConfig.pool_size / (world * (batch // 2)))
    return 0


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sweep(dim=512, batch=128, world=2, sample_rate=0.1, heads=SWEEP_HEADS, steps=3, warmup=1,
          classes=SWEEP_CLASSES, emit=print, memory_share=0.85):
    """Every head type at every C, float32 and the lean mode (bfloat16 rows, int8 momentum); the naive
    baseline where it fits. Full FC uses every row (sample rate 1); a configuration whose planned
    peak over the ranks exceeds `memory_share` of this machine's memory is reported as skipped."""
    from engine.plan import PlanInput, plan
    records = []
    lean = (lean_compute_dtype(), "bfloat16", "int8")
    budget = memory_share * physical_memory_bytes()
    for c in classes:
        for head in heads:
            rate = 1.0 if head == "full" else sample_rate
            for dtype, storage, momentum in (("float32", "float32", "float32"), lean):
                planned = plan(PlanInput(classes=c, dim=dim, world=world, sample_rate=rate, batch=batch,
                                         head=head, storage_dtype=storage, compute_dtype=dtype,
                                         momentum_dtype=momentum)).total
                if planned * world > budget:
                    rec = dict(head=head, classes=c, dim=dim, batch=batch, world=world, sample_rate=rate,
                               dtype=dtype, storage_dtype=storage, momentum_dtype=momentum,
                               planned_peak_bytes_per_rank=planned,
                               skipped=f"planned {planned * world / 2**30:.1f} GiB over {world} ranks > "
                                       f"{memory_share:.0%} of {physical_memory_bytes() / 2**30:.1f} GiB")
                else:
                    rec = bench_config(c, dim, batch, world, rate, head=head, dtype=dtype, steps=steps,
                                       warmup=max(warmup, fill_steps(head, batch, world) + warmup),
                                       storage_dtype=storage, momentum_dtype=momentum,
                                       naive=(c <= NAIVE_MAX_CLASSES and head == "partial" and storage == "float32"))
                records.append(rec)
                emit(rec)
    return records


def plot_sweep(records: list[dict], path: str) -> None:
    """Step time and peak memory per rank against C, ours (each head/dtype) and the naive baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in records:
        if "skipped" in r:
            continue
        rate = f" rho={r['sample_rate']:g}" if r["head"] in ("full", "partial", "mutual") else ""
        series.setdefault(f"{r['head']}{rate} {r['dtype']}/{r['storage_dtype']}", []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["classes"])
        cs = [r["classes"] for r in rs]
        ax_t.plot(cs, [r["step_seconds_median"] for r in rs], "o-", label=name)
        ax_m.plot(cs, [r["peak_rss_bytes_per_rank"] / 2**30 for r in rs], "o-", label=name)
    naive = sorted((r for r in records if "naive_step_seconds_median" in r), key=lambda r: r["classes"])
    if naive:
        cs = [r["classes"] for r in naive]
        ax_t.plot(cs, [r["naive_step_seconds_median"] for r in naive], "k--x", label="naive partial fp32")
        ax_m.plot(cs, [r["naive_peak_rss_bytes_per_rank"] / 2**30 for r in naive], "k--x", label="naive partial fp32")
    for ax, label in ((ax_t, "head step (s)"), (ax_m, "peak RSS per rank (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_m.axhline(12, color="r", lw=0.8, ls=":", label="half of 24 GiB")
    ax_m.legend(fontsize=7)
    first = next((r for r in records if "skipped" not in r), records[0] if records else {})
    fig.suptitle(f"Head step vs number of classes ({first.get('world', '?')} gloo ranks, D={first.get('dim', '?')}, "
                 f"B={first.get('batch', '?')} per rank; GEMM dtype / row storage)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
