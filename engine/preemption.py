"""Stopping cleanly when the cluster says so: SIGTERM / SIGINT, and SIGUSR1 (what SLURM sends before a
time limit with `--signal=USR1@<seconds>`).

    stopper = Preemption(grace_period_s=120).install()
    while training:
        step()
        if stopper.should_stop(state.device):     # an all-reduce: every rank stops at the same step
            save_checkpoint(); break               # then the process exits 0

The handler only sets a flag; the loop finishes the step it is in, the ranks agree through an
all-reduce (MAX) of the flag, so a signal that reached one rank stops them all at the same step, and
the trainer saves and returns. A watchdog thread started by the first signal ends the process (exit
code 143) if it is still alive `grace_period_s` later: a step or a save that cannot finish before the
scheduler's hard kill is cut short while the previous checkpoint is intact (saves are atomic).
A second SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preemption:
    def __init__(self, grace_period_s: float = 120.0, signals=SIGNALS):
        self.grace_period_s = float(grace_period_s)
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.requested = False
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict = {}
        self._watchdog: threading.Thread | None = None

    def install(self) -> "Preemption":
        """Installs the handlers (main thread only; elsewhere it does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            self.signal_name = name
            self.received_at = time.monotonic()
            print(f"received {name}: finishing this step, then saving a checkpoint and exiting "
                  f"(grace period {self.grace_period_s:g} s)", file=sys.stderr, flush=True)
            if self.grace_period_s > 0:
                self._watchdog = threading.Thread(target=self._expire, daemon=True)
                self._watchdog.start()

    def _expire(self) -> None:
        time.sleep(self.grace_period_s)
        print(f"the grace period of {self.grace_period_s:g} s after {self.signal_name} ran out before the "
              "checkpoint was saved; exiting (the previous checkpoint is intact)", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(143)

    def should_stop(self, device: torch.device | str = "cpu", group=None) -> bool:
        """Whether any rank received a signal (collective over `group` when distributed)."""
        flag = self.requested
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = bool(t.item())
            if flag and not self.requested:
                self.signal_name = "a signal to another rank"
        return flag


def skip_nonfinite_step(trainer, batches, micro: int, loss: float, timings: dict) -> dict:
    """Drops the current optimizer step after micro-batch `micro` gave a non-finite loss (the loss is
    identical on every rank, so every rank drops it): the step's remaining micro-batches are consumed
    (the data position stays aligned with the step count), nothing is updated, the step counter moves
    on and the skip is counted. The trainer halts after `checkpoint.max_nonfinite_steps` in a row."""
    from engine.trainer import NonFiniteLoss

    backbone, cfg = trainer.backbone, trainer.cfg
    trainer.head.skip_step()
    if micro > 0:     # earlier micro-batches of this step already put gradients into the backbone
        if backbone.kind == "deepspeed":
            raise NonFiniteLoss(f"step {trainer.step + 1}: the loss is {loss} at micro-batch {micro + 1} of "
                                f"{cfg.optim.grad_accum}; DeepSpeed's accumulated gradients cannot be dropped "
                                "mid-window. Lower optim.lr or enable optim.clip_grad_norm")
        backbone.optimizer.zero_grad(set_to_none=True)
    ctx = getattr(backbone, "_sync_ctx", None)
    if ctx is not None:                  # DDP no_sync entered by this micro-batch's forward
        ctx.__exit__(None, None, None)
        backbone._sync_ctx = None
    backbone._micro -= micro
    for _ in range(micro + 1, cfg.optim.grad_accum):
        next(batches)
    trainer.nonfinite["total"] += 1
    trainer.nonfinite["in_a_row"] += 1
    lr = trainer.schedule(trainer.step)
    trainer.step += 1
    if trainer.is_main:
        print(f"step {trainer.step}: non-finite loss ({loss}); step skipped "
              f"({trainer.nonfinite['in_a_row']} in a row, {trainer.nonfinite['total']} in all)", flush=True)
    trainer.timings = timings
    return {"loss": loss, "lr": lr, "samples": 0, "applied": False, "grad_norm_backbone": None,
            "grad_norm_head": float("nan"), "active_classes": None, "timings": timings}
