"""One head step timed on W local gloo ranks, next to a naive implementation measured the same way.

The naive head is what a straightforward Partial FC does (arcface_torch's partial_fc_v2 shape): the
shard is an nn.Parameter, the active rows are taken with autograd indexing (a dense C_r x D
gradient), logits are materialized whole, the softmax goes through autograd all-reduces and
torch.optim.SGD updates every row.
"""
from __future__ import annotations

import math
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from parallel.bank import initial_rows
from parallel.collectives import all_gather_rows, gather_batch
from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig
from parallel.heads.memory import synthetic_batch
from parallel.heads.sampling import sample_rows
from parallel.sharding import ClassShard


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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


def _bench_rank(state, cfg: dict):
    torch.manual_seed(cfg["seed"] + state.rank)
    dtype = cfg["dtype"]
    margin = MarginConfig(m1=1.0, m2=0.5, m3=0.0, scale=64.0)
    kind = cfg["impl"]
    if kind == "naive":
        head = NaiveHead(state, cfg["classes"], cfg["dim"], cfg["sample_rate"], margin, cfg["seed"])
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        hc = HeadConfig(type=cfg["head"], sample_rate=cfg["sample_rate"], margin=margin,
                        compute_dtype=dtype, storage_dtype=cfg.get("storage_dtype", "float32"),
                        chunk_size=cfg["chunk_size"], seed=cfg["seed"])
        head = build_head(hc, state, cfg["classes"], cfg["dim"])
    b, d = cfg["batch"], cfg["dim"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 31 + state.rank)
    times = []
    active = None
    for it in range(cfg["warmup"] + cfg["steps"]):
        x = torch.randn(b, d, generator=gen, requires_grad=True)
        labels = torch.randint(0, cfg["classes"], (b,), generator=gen)
        if state.world_size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        if kind == "naive":
            loss = head(x, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            out = head(x, labels, synthetic_batch(head, b, gen))
            out.loss.backward()
            head.step(lr=0.1)
            active = head.last_active.num_active if hasattr(head, "last_active") else head.active_columns
        t = time.perf_counter() - t0
        if it >= cfg["warmup"]:
            times.append(t)
    if active is None:
        active = max(head.num_sample, 1)
    # the matmul peak: one plain GEMM of the step's shape in the same dtype, same process
    bg = b * state.world_size
    mm_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    xa = torch.randn(bg, d).to(mm_dtype)
    wa = torch.randn(d, active).to(mm_dtype)
    mm_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(xa, wa)
        mm_times.append(time.perf_counter() - t0)
    mm_peak = 2.0 * bg * d * active / min(mm_times) / 1e9
    return dict(step_seconds=times, active=active, peak_rss=peak_rss_bytes(), gflops_matmul_peak=mm_peak)


def bench_config(classes, dim, batch, world, sample_rate, head="partial", dtype="float32", chunk_size=8192,
                 steps=5, warmup=2, seed=0, naive=True, storage_dtype="float32", timeout=1800.0) -> dict:
    """Runs ours (and the naive head) on `world` local gloo ranks; returns one JSON-able record."""
    from parallel.local_ranks import run_ranks
    cfg = dict(classes=classes, dim=dim, batch=batch, sample_rate=sample_rate, head=head, dtype=dtype,
               chunk_size=chunk_size, steps=steps, warmup=warmup, seed=seed, storage_dtype=storage_dtype)
    ours = run_ranks(_bench_rank, world, args=(dict(cfg, impl="ours"),), timeout=timeout)
    step = statistics.median(max(r["step_seconds"][i] for r in ours) for i in range(steps))
    active = ours[0]["active"]
    bg = batch * world
    record = dict(
        head=head, classes=classes, dim=dim, batch=batch, world=world, sample_rate=sample_rate, dtype=dtype,
        storage_dtype=storage_dtype, chunk_size=chunk_size, active_classes_per_rank=active,
        step_seconds_median=step, samples_per_second=bg / step,
        gflops_achieved=6.0 * bg * dim * active / step / 1e9,
        gflops_matmul_peak=statistics.median(r["gflops_matmul_peak"] for r in ours),
        peak_rss_bytes_per_rank=max(r["peak_rss"] for r in ours),
    )
    record["fraction_of_matmul_peak"] = record["gflops_achieved"] / record["gflops_matmul_peak"]
    if naive:
        base = run_ranks(_bench_rank, world, args=(dict(cfg, impl="naive", dtype="float32"),), timeout=timeout)
        nstep = statistics.median(max(r["step_seconds"][i] for r in base) for i in range(steps))
        record.update(naive_step_seconds_median=nstep,
                      naive_peak_rss_bytes_per_rank=max(r["peak_rss"] for r in base),
                      speedup_vs_naive=nstep / step)
        record["memory_ratio_vs_naive"] = record["peak_rss_bytes_per_rank"] / record["naive_peak_rss_bytes_per_rank"]
    return record
