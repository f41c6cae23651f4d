"""Runs a function on W local gloo ranks (separate processes on 127.0.0.1) and returns each rank's
result: the multi-rank test fixture and the benchmarks use it.

    results = run_ranks(fn, world_size=3, args=(...))   # fn(state: ParallelState, *args) -> picklable

A rank that raises makes the call fail with that rank's traceback; a rank that dies or hangs past
`timeout` makes it fail naming the rank. Results travel as torch.save bytes (tensors included).
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, kwargs, threads, results):
    import torch.distributed as dist

    from parallel.groups import init_parallel, shutdown_parallel

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        if world_size > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=120))
        state = init_parallel()
        value = fn(state, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        shutdown_parallel()


class RankFailure(AssertionError):
    pass


def run_ranks(fn, world_size: int, args=(), kwargs=None, timeout: float = 180.0, threads: int | None = None,
              env: dict | None = None):
    """`env`: variables set for the rank processes only (read at their start, e.g. glibc's MALLOC_*)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 2) // world_size)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, kwargs or {}, threads, results),
                    daemon=True)
        for r in range(world_size)
    ]
    saved = {key: os.environ.get(key) for key in env or {}}
    try:
        os.environ.update(env or {})
        for p in procs:
            p.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outcome: dict[int, tuple[str, bytes | str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.5)
                outcome[rank] = (status, payload)
                if status == "error":
                    raise RankFailure(f"rank {rank} of {world_size} raised:\n{payload}")
                continue
            except queue_module.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in outcome and not p.is_alive():
                    # a last result may still be in flight
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                        outcome[rank] = (status, payload)
                        if status == "error":
                            raise RankFailure(f"rank {rank} of {world_size} raised:\n{payload}")
                        continue
                    except queue_module.Empty:
                        raise RankFailure(
                            f"rank {r} of {world_size} died with exit code {p.exitcode} before returning"
                        ) from None
            if time.monotonic() > deadline:
                pending = sorted(set(range(world_size)) - set(outcome))
                raise RankFailure(f"ranks {pending} of {world_size} did not finish within {timeout:.0f} s")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [torch.load(io.BytesIO(outcome[r][1]), weights_only=False) for r in range(world_size)]
