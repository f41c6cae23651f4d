"""What a run reports: a Prometheus endpoint per rank, TensorBoard scalars and a progress line on rank 0.

Each `TrainMetrics` owns its own `CollectorRegistry` (never the global one), so several trainers can live
in one process (tests). Every series carries the labels rank, local_rank and node; job and instance
labels are the scraper's business. The HTTP port is `metrics.prometheus_port + local_rank`.
"""
from __future__ import annotations

import datetime
import os
import resource
import sys
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

PREFIX = "shardface"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


def rss_bytes() -> int:
    """Resident bytes of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Largest resident bytes of this process so far: the memory map's high-water mark (VmHWM).
    Not getrusage's ru_maxrss, which Linux carries across fork and exec: a process started from a
    large parent (a test runner, a launcher) would report at least the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class TrainMetrics:
    """Counters, gauges and a histogram of one rank; `record_step` updates them all for one step."""

    def __init__(self, cfg, *, rank: int, local_rank: int, node: int, output_dir: str | None,
                 total_steps: int, build_info: dict | None = None, is_main: bool | None = None):
        self.cfg = cfg
        self.rank = rank
        self.total_steps = total_steps
        self.is_main = (rank == 0) if is_main is None else is_main
        self.registry = CollectorRegistry()
        names = ("rank", "local_rank", "node")
        values = (str(rank), str(local_rank), str(node))
        reg = self.registry

        def counter(name, doc):
            return Counter(f"{PREFIX}_{name}", doc, names, registry=reg).labels(*values)

        def gauge(name, doc, extra=()):
            g = Gauge(f"{PREFIX}_{name}", doc, names + tuple(extra), registry=reg)
            return g if extra else g.labels(*values)

        self._values = values
        # Counter names get `_total` appended by prometheus_client.
        self.samples = counter("train_samples", "Training samples consumed by this rank")
        self.steps = counter("train_steps", "Optimizer steps taken")
        self.skipped_steps = counter("train_skipped_steps", "Optimizer steps dropped (fp16 overflow)")
        self.data_wait = counter("train_data_wait_seconds", "Seconds spent waiting for the data loader")
        self.decode_errors = counter("data_decode_errors", "Samples skipped because they failed to decode")
        self.step_duration = Histogram(f"{PREFIX}_train_step_duration_seconds", "Wall time of one optimizer step",
                                       names, buckets=STEP_BUCKETS, registry=reg).labels(*values)
        self.loss = gauge("train_loss", "Global-batch loss of the last step")
        self.lr = gauge("train_learning_rate", "Learning rate of the last step")
        self.grad_norm = gauge("train_grad_norm", "Global gradient norm before clipping", extra=("part",))
        self.active_classes = gauge("head_active_classes", "Class centers active on this rank in the last step")
        self.memory = gauge("process_memory_bytes", "Memory of this rank", extra=("kind",))
        self.samples_per_second = gauge("train_samples_per_second", "Throughput of this rank over the last step")
        self.info = Info(f"{PREFIX}_build", "Versions and the run's setup", names, registry=reg)
        self.info.labels(*values).info({k: str(v) for k, v in (build_info or {}).items()})

        self.server = None
        self.port = None
        if cfg.prometheus:
            self.port = cfg.prometheus_port + local_rank
            try:
                self.server, _thread = start_http_server(self.port, addr=cfg.prometheus_bind, registry=reg)
            except OSError as err:   # a taken port must not stop training
                print(f"rank {rank}: no Prometheus endpoint on {cfg.prometheus_bind}:{self.port} ({err}); "
                      "set metrics.prometheus_port to a free base port", file=sys.stderr, flush=True)
                self.port = None

        self.writer = None
        self.tensorboard_dir = None
        if cfg.tensorboard and self.is_main and output_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = os.path.join(output_dir, "tensorboard")
            self.writer = SummaryWriter(self.tensorboard_dir)

        self._bar = None
        if self.is_main and cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self._start = time.perf_counter()
        self._window_start = self._start
        self._window_samples = 0
        self._global_samples = 0

    def record_decode_errors(self, total: int) -> None:
        """Moves the decode-error counter up to the loader's running total."""
        delta = total - self.decode_errors._value.get()
        if delta > 0:
            self.decode_errors.inc(delta)

    def record_step(self, step: int, *, samples: int, global_samples: int, seconds: float, data_wait: float,
                    loss: float, lr: float, grad_norms: dict[str, float], active_classes: float | None = None,
                    skipped: bool = False, timings: dict[str, float] | None = None) -> None:
        """`step` is the 1-based number of optimizer steps done; `samples` this rank's, `global_samples` all ranks'."""
        self.samples.inc(samples)
        self.steps.inc()
        if skipped:
            self.skipped_steps.inc()
        self.data_wait.inc(max(0.0, data_wait))
        self.step_duration.observe(seconds)
        self.loss.set(loss)
        self.lr.set(lr)
        for part, value in grad_norms.items():
            if value is not None:
                self.grad_norm.labels(*self._values, part).set(value)
        if active_classes is not None:
            self.active_classes.set(active_classes)
        self.samples_per_second.set(samples / seconds if seconds > 0 else 0.0)
        self.memory.labels(*self._values, "rss").set(rss_bytes())
        if torch.cuda.is_available():
            self.memory.labels(*self._values, "device_allocated").set(torch.cuda.memory_allocated())
            self.memory.labels(*self._values, "device_peak").set(torch.cuda.max_memory_allocated())
        self._global_samples += global_samples
        self._window_samples += global_samples

        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/step_seconds", seconds, step)
            self.writer.add_scalar("train/data_wait_seconds", data_wait, step)
            for part, value in grad_norms.items():
                if value is not None:
                    self.writer.add_scalar(f"train/grad_norm_{part}", value, step)
            if active_classes is not None:
                self.writer.add_scalar("train/active_classes", active_classes, step)
            for name, value in (timings or {}).items():
                self.writer.add_scalar(f"time/{name}", value, step)

        if not self.is_main:
            return
        now = time.perf_counter()
        rate = self._window_samples / max(1e-9, now - self._window_start)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_s=f"{rate:.1f}")
            self._window_start, self._window_samples = now, 0
        elif step % self.cfg.log_every == 0 or step == self.total_steps or step == 1:
            elapsed = now - self._start
            eta = elapsed / step * (self.total_steps - step) if step else float("inf")
            print(f"step {step}/{self.total_steps}  {rate:.1f} samples/s  loss {loss:.4f}  lr {lr:.4g}  "
                  f"elapsed {_format_eta(elapsed)}  eta {_format_eta(eta)}", flush=True)
            self._window_start, self._window_samples = now, 0

    def record_eval(self, step: int, results: dict) -> None:
        if self.writer is None:
            return
        for key, value in results.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def log(msg: str, is_main: bool = True) -> None:
    if is_main:
        print(msg, file=sys.stdout, flush=True)
