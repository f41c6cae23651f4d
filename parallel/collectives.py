"""Autograd collectives, each paired with its exact adjoint. The group is always explicit; with one
rank (or group None) every function returns its input. Buffers are allocated on the input's device."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist

from parallel.groups import group_size

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommBytes:
    """Bytes each rank sends into collectives, by operation, while a `count_comm_bytes()` block runs
    (all-gather/reduce-scatter/all-reduce payloads as seen by this rank, i.e. the input size)."""

    def __init__(self):
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, op: str, tensor: torch.Tensor) -> None:
        self.by_op[op] += tensor.numel() * tensor.element_size()


_active_counters: list[CommBytes] = []


@contextlib.contextmanager
def count_comm_bytes():
    counter = CommBytes()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)


def _record(op: str, tensor: torch.Tensor) -> None:
    for counter in _active_counters:
        counter.add(op, tensor)


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(B, ...) on every rank -> (W*B, ...) in rank order. No autograd. B must match across ranks."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    _record("all_gather", x)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(W*B, ...) on every rank -> sum over ranks of this rank's (B, ...) slice. No autograd."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    _record("reduce_scatter", x)
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (no autograd); returns x."""
    if group_size(group) > 1:
        _record("all_reduce", x)
        dist.all_reduce(x, op=op, group=group)
    return x


class _GatherBatch(torch.autograd.Function):
    """Forward: all-gather along the batch. Backward: reduce-scatter (sum) back to each rank's rows,
    times `grad_scale`."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        ctx.group = group
        ctx.grad_scale = grad_scale
        out = all_gather_rows(x, group)
        return out.view_as(out) if out is x else out

    @staticmethod
    def backward(ctx, grad_global):
        grad_local = reduce_scatter_rows(grad_global, ctx.group)
        if ctx.grad_scale != 1.0:
            grad_local = grad_local * ctx.grad_scale
        return grad_local, None, None


def gather_batch(x: torch.Tensor, group, grad_scale: float = 1.0) -> torch.Tensor:
    """x (B, D) -> x_global (W*B, D) with gradient flowing back to each rank's own rows.

    `grad_scale` multiplies the returned gradient: pass the data-parallel world size when the
    backbone's gradients are later averaged over ranks, so the average equals the gradient of the
    whole global batch on one process.
    """
    if group_size(group) == 1 and grad_scale == 1.0:
        return x
    return _GatherBatch.apply(x, group, grad_scale)


class _GatheredBatch(torch.autograd.Function):
    """Identity on an all-gather already completed; backward is the same reduce-scatter as gather_batch."""

    @staticmethod
    def forward(ctx, x, gathered, group, grad_scale):
        ctx.group = group
        ctx.grad_scale = grad_scale
        return gathered

    @staticmethod
    def backward(ctx, grad_global):
        grad_local = reduce_scatter_rows(grad_global, ctx.group)
        if ctx.grad_scale != 1.0:
            grad_local = grad_local * ctx.grad_scale
        return grad_local, None, None, None


class GatheredRows:
    """x_global (W*B, D) gathered from every rank's x (B, D), for a consumer that forms the gradient of
    x_global itself, ahead of the backward pass (the fused margin softmax): it starts the
    reduce-scatter that takes that gradient back to each rank's rows as soon as it has it
    (`start_scatter`), goes on computing while the transfer is in flight, and its backward awaits
    it (`wait_scatter`), times `grad_scale` like gather_batch. `value` is detached; the consumer's
    autograd input is `local`."""

    def __init__(self, local: torch.Tensor, value: torch.Tensor, group, grad_scale: float):
        self.local, self.value, self.group, self.grad_scale = local, value, group, grad_scale
        self._out = self._work = None

    def start_scatter(self, grad_global: torch.Tensor) -> None:
        """Starts reducing `grad_global (W*B, D)` over the ranks to this rank's (B, D) rows."""
        if group_size(self.group) == 1:
            self._out = grad_global
            return
        grad_global = grad_global.contiguous()
        _record("reduce_scatter", grad_global)
        self._out = torch.empty((self.local.shape[0],) + tuple(grad_global.shape[1:]), dtype=grad_global.dtype,
                                device=grad_global.device)
        self._work = _reduce_scatter_single(self._out, grad_global, op=dist.ReduceOp.SUM, group=self.group,
                                            async_op=True)

    def wait_scatter(self) -> torch.Tensor:
        """This rank's (B, D) gradient, times grad_scale (once per start_scatter)."""
        if self._out is None:
            raise RuntimeError("GatheredRows.wait_scatter() without start_scatter()")
        if self._work is not None:
            self._work.wait()
        out, self._out, self._work = self._out, None, None
        return out * self.grad_scale if self.grad_scale != 1.0 else out


class PendingGather:
    """An all-gather of the batch in flight: `wait()` returns x_global with gather_batch's autograd,
    `rows()` the GatheredRows of a consumer that reduce-scatters the gradient itself."""

    def __init__(self, x: torch.Tensor, group, grad_scale: float):
        self.x, self.group, self.grad_scale = x, group, grad_scale
        self.work = None
        if group_size(group) > 1:
            src = x.detach().contiguous()
            _record("all_gather", src)
            self.out = torch.empty((group_size(group) * src.shape[0],) + tuple(src.shape[1:]),
                                   dtype=src.dtype, device=src.device)
            self.work = _all_gather_single(self.out, src, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        if self.work is None:
            return gather_batch(self.x, self.group, self.grad_scale)
        self.work.wait()
        return _GatheredBatch.apply(self.x, self.out, self.group, self.grad_scale)

    @property
    def value(self) -> torch.Tensor:
        """x_global (W*B, D), detached, once gathered (waits for the transfer)."""
        if self.work is None:
            return self.x.detach()
        self.work.wait()
        return self.out

    def rows(self) -> GatheredRows:
        return GatheredRows(self.x, self.value, self.group, self.grad_scale)


def gather_batch_async(x: torch.Tensor, group, grad_scale: float = 1.0) -> PendingGather:
    """Starts gather_batch's all-gather and returns at once, so work that does not need the
    embeddings (choosing the step's classes) overlaps the transfer."""
    return PendingGather(x, group, grad_scale)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: the sum of the incoming gradients over ranks (the loss of
    every rank depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(), ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _ReduceToReplicated(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity.

    For a term each rank computes from its own inputs and adds to a loss that every rank holds the
    same copy of: each rank backpropagates that copy through its own part only, so every input's
    gradient is counted once (unlike `all_reduce_sum`, whose backward sums over ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_to_replicated(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _ReduceToReplicated.apply(x, group)
