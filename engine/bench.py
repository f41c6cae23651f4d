"""Training throughput and the split of a step: data wait, backbone forward, head forward, backward
(backbone + head, with the head's gradient collectives and ZeRO/DDP reduction), backbone optimizer
step, head step; plus the time of one all-reduce of a backbone-sized fp32 gradient (the data-parallel
communication a step pays) measured on its own. One JSON object per run, printed by rank 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

BENCH_TAG = '{"bench": "train"'


def _allreduce_seconds(numel: int, state, repeats: int = 3) -> float | None:
    if state.data_group is None or state.data_world == 1:
        return None
    buf = torch.ones(numel, dtype=torch.float32, device=state.device)
    dist.all_reduce(buf, group=state.data_group)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buf, group=state.data_group)
    return (time.perf_counter() - start) / repeats


def bench_in_job(config: str | None, overrides: list[str], steps: int, warmup: int) -> dict | None:
    """Runs inside a launched job (every rank); returns the result on rank 0."""
    from engine.config import load_config
    from engine.trainer import Trainer, setup_distributed
    from parallel.groups import shutdown_parallel

    cfg = load_config(config, list(overrides) + ["metrics.prometheus=false", "metrics.tensorboard=false",
                                                 "eval.every_n_steps=0", "eval.bins=[]"])
    state = setup_distributed(cfg.engine)
    try:
        trainer = Trainer(cfg, state, metrics=False)
        trainer.eval_hook = None
        batches = trainer._batches()
        for _ in range(warmup):
            trainer.train_step(batches)
        totals: dict[str, float] = {}
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches)
            for key, value in trainer.timings.items():
                totals[key] = totals.get(key, 0.0) + value
        elapsed = time.perf_counter() - start
        numel = sum(p.numel() for p in trainer.backbone.module.parameters())
        comm = _allreduce_seconds(numel, state)
        times = torch.tensor([elapsed] + [totals[k] for k in sorted(totals)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(times, op=dist.ReduceOp.MAX)      # the slowest rank sets the pace
        elapsed = float(times[0])
        split = {k: float(v) / steps for k, v in zip(sorted(totals), times[1:].tolist())}
        result = {
            "bench": "train", "config": config, "overrides": list(overrides),
            "backbone": cfg.model.backbone, "head": cfg.head.type, "sample_rate": cfg.head.sample_rate,
            "num_classes": trainer.num_classes, "engine": trainer.backbone.kind,
            "zero_stage": (trainer.backbone.engine.zero_optimization_stage()
                           if trainer.backbone.kind == "deepspeed" else None),
            "precision": cfg.precision, "world_size": state.world_size,
            "threads_per_rank": torch.get_num_threads(), "micro_batch": cfg.data.batch_size,
            "grad_accum": cfg.optim.grad_accum, "global_batch": trainer.global_batch,
            "steps": steps, "warmup_steps": warmup,
            "samples_per_second": trainer.global_batch * steps / elapsed,
            "step_seconds": elapsed / steps,
            "split_seconds_per_step": split,
            "allreduce_backbone_grads_seconds": comm,
            "backbone_parameters": numel,
        }
        return result if state.is_main else None
    finally:
        shutdown_parallel()


def run_bench(config: str | None, overrides: list[str], steps: int, warmup: int, world_size: int,
              launcher: str = "deepspeed") -> dict:
    """From a plain process: starts `world_size` ranks through the launcher (or runs here for one)
    and returns rank 0's JSON."""
    if world_size <= 1 or "LOCAL_RANK" in os.environ:
        return bench_in_job(config, overrides, steps, warmup)
    from engine.demo import ROOT, launcher_command, rank_env

    cmd, kind = launcher_command(os.path.join(ROOT, "tools", "bench_train.py"), world_size, prefer=launcher)
    if config:
        cmd += ["--config", config]
    for item in overrides + (["engine=ddp"] if kind == "torchrun" else []):
        cmd += ["--set", item]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(world_size), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(BENCH_TAG):
            return json.loads(line)
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise RuntimeError(f"bench run failed with exit code {proc.returncode}")
