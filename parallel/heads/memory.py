"""What the heads over a memory of momentum-encoder embeddings (DCQ, F2C) share.

These heads have no class-center parameters. Their columns are embeddings of earlier samples made
by a momentum (EMA) copy of the backbone, kept in a memory sharded over the head group. The engine
owns the EMA network (engine/ema.py) and puts its embeddings in `batch`; a head says what it needs:

    head.needs             batch keys the engine must fill, e.g. ("keys",) for DCQ
    head.sampling          which sampler feeds it: "pairs" (each sample comes with a second image
                           of its identity) or "dual" (identity-loader pairs + instance halves)
    head.ema_momentum      momentum of the EMA network the engine keeps (updated before its forward)
    head.evaluate_with_ema whether evaluation should run the EMA network instead of the backbone

`step(lr, grad_scale)` commits what the last forwards prepared (enqueue, pool writes); there is no
optimizer. `skip_step()` drops it.
"""
from __future__ import annotations

import torch

from parallel.bank import DTYPES
from parallel.groups import ParallelState
from parallel.heads.base import Head, check_labels
from parallel.heads.config import HeadConfig
from parallel.margins import Margin


def synthetic_batch(head, rows: int, generator: torch.Generator) -> dict | None:
    """Random stand-ins for what `head.needs` (benchmarks): (rows, D) embeddings per key."""
    needs = getattr(head, "needs", ())
    if not needs:
        return None
    return {key: torch.randn(rows, head.embedding_size, generator=generator).to(head.device) for key in needs}


class MemoryHead(Head):
    needs: tuple[str, ...] = ()
    sampling: str = "instance"
    active_columns: int = 0     # softmax columns this rank used in the last forward (benchmarks, metrics)

    def __init__(self, cfg: HeadConfig, state: ParallelState, num_classes: int, embedding_size: int, options):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.options = options
        self.state = state
        self.group = state.head_group
        self.rank = state.head_rank
        self.world = state.head_world
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = Margin.from_config(options.margin)
        self.compute_dtype = DTYPES[cfg.compute_dtype]
        self.storage_dtype = DTYPES[cfg.storage_dtype]
        self.device = state.device
        self._pending: list = []

    @property
    def ema_momentum(self) -> float:
        return float(self.options.momentum)

    @property
    def evaluate_with_ema(self) -> bool:
        return self.options.eval_network == "ema"

    def check_inputs(self, x: torch.Tensor, labels: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Validates shapes and (unless the head checks the gathered labels itself) the label range;
        returns the labels as int64 on x's device."""
        if x.dim() != 2 or x.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(device=x.device, dtype=torch.long)
        if check_range:
            check_labels(labels, self.num_classes, self.state.rank)
        return labels

    def batch_tensor(self, batch: dict | None, key: str, rows: int) -> torch.Tensor:
        """batch[key] as a detached (rows, D) tensor, with an error naming the key when it is wrong."""
        if batch is None or key not in batch:
            raise ValueError(f"the {self.name} head needs batch[{key!r}] (EMA-network embeddings, "
                             f"({rows}, {self.embedding_size})); the engine fills head.needs = {self.needs}")
        value = batch[key]
        if not torch.is_tensor(value) or tuple(value.shape) != (rows, self.embedding_size):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"batch[{key!r}] must be ({rows}, {self.embedding_size}), got {shape}")
        return value.detach().to(self.device)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.compute_dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def step(self, lr: float = 0.0, grad_scale: float = 1.0) -> None:
        """Commits the memory writes of every forward since the last step, in order (no optimizer)."""
        pending, self._pending = self._pending, []
        for item in pending:
            self.commit(item)

    def commit(self, item) -> None:
        raise NotImplementedError

    def skip_step(self) -> None:
        self._pending = []

    def grad_sq_norm(self) -> torch.Tensor:
        """No head parameters: contributes nothing to a global gradient norm."""
        return torch.zeros(())

    def pending_grads(self) -> list:
        return []

    def state_bytes(self) -> int:
        """Bytes of everything this rank's head keeps between steps (its buffers: no host-side maps)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
