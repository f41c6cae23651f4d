"""Host reads of device values during a training step.

On an accelerator, reading a device value on the host (`bool(t)`, `t.item()`, boolean-mask indexing,
`torch.unique`, `nonzero`) waits for every kernel queued so far: the step stalls and the queue
drains. The head makes no such read there:

- where a test on the data would pick a cheaper path (any clamped cosine? any target in this chunk?),
  the head computes the masks unconditionally instead;
- input errors found on the device (labels out of range, a row without exactly one target) are
  recorded as device flags; `DeferredErrors` copies them to the host without waiting and raises at
  the next step once the copy has landed. The offending rows are left out of that step's loss (no
  gradient), so a bad label corrupts nothing before it is reported.

On the CPU a read costs nothing beyond the computation it waits for, so the head tests and raises at
once (the error names the label and its position in the same step). `host_reads(False)` imposes the
accelerator behaviour on the CPU: the tests run a step under a dispatch mode that fails on any host
read and prove there is none.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable

import torch

_allowed: bool | None = None   # None: decided by the device type


def host_reads_are_cheap(device: torch.device | str) -> bool:
    """True where the head may read device values on the host in a step (the CPU, unless overridden)."""
    if _allowed is not None:
        return _allowed
    return torch.device(device).type == "cpu"


@contextlib.contextmanager
def host_reads(allowed: bool):
    """Within the block the head behaves as on an accelerator (False) or as on the CPU (True)."""
    global _allowed
    previous, _allowed = _allowed, bool(allowed)
    try:
        yield
    finally:
        _allowed = previous


def first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any (), index of the first True () or 0) of a 1-d bool mask, without leaving the device."""
    if mask.numel() == 0:
        zero = torch.zeros((), dtype=torch.long, device=mask.device)
        return zero.bool(), zero
    return mask.any(), mask.to(torch.uint8).argmax()


class DeferredErrors:
    """Errors found on the device, raised on the host without waiting for the device.

    `report(found, details, describe)`: `found ()` bool tensor, `details (k,)` numbers the message
    needs, `describe(list_of_details) -> Exception`. Where host reads are cheap it raises at once;
    elsewhere it starts a non-blocking copy and `raise_ready()` (called at every step) raises the
    first error whose copy has landed; `raise_ready(wait=True)` waits for all of them (end of
    training, a checkpoint).
    """

    def __init__(self):
        self._pending: deque = deque()

    def report(self, found: torch.Tensor, details: torch.Tensor,
               describe: Callable[[list], Exception]) -> None:
        values = torch.cat([found.reshape(1).to(torch.float64), details.reshape(-1).to(torch.float64)])
        if host_reads_are_cheap(values.device):
            self._raise_if_found(values.cpu(), describe)
            return
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # the CPU under host_reads(False), or a device without events: read at the next step
            host, event = values, None
        self._pending.append((host, event, describe))

    def raise_ready(self, wait: bool = False) -> None:
        while self._pending:
            host, event, describe = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.popleft()
            self._raise_if_found(host, describe)

    @staticmethod
    def _raise_if_found(values: torch.Tensor, describe) -> None:
        values = values.tolist()
        if values[0]:
            raise describe(values[1:])
