"""Process-group handling for `deepspeed`, `torchrun` and plain `python` (one rank).

Everything that communicates takes a group explicitly; `ParallelState` is the one object that owns
them. A group of `None` means "this process alone" and every collective returns early for it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


@dataclass
class ParallelState:
    """Ranks, device and the two groups of a run.

    head_group: the model-parallel group over which class centers are sharded (default: all ranks).
    data_group: the data-parallel group over which backbone gradients are averaged (default: all ranks).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    head_group: object = None
    data_group: object = None

    @property
    def head_rank(self) -> int:
        return group_rank(self.head_group)

    @property
    def head_world(self) -> int:
        return group_size(self.head_group)

    @property
    def data_world(self) -> int:
        return group_size(self.data_group)

    @property
    def node_rank(self) -> int:
        return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> "ParallelState":
        """One process, no process group."""
        device = torch.device(device) if device is not None else default_device(0)
        return cls(rank=0, world_size=1, local_rank=0, device=device)


def default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_parallel(timeout_s: float = 1800.0, backend: str | None = None) -> ParallelState:
    """Joins the job the launcher started (or runs alone when there is none).

    Rank and world come from the environment the launchers set (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). A process without them is a one-rank run and initialises nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1 and not dist.is_initialized():
        return ParallelState(rank=0, world_size=1, local_rank=local_rank, device=device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or default_backend(device),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.group.WORLD
    return ParallelState(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        head_group=world,
        data_group=world,
    )


def shutdown_parallel() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
