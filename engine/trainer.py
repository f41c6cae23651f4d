"""The training loop: a data-parallel backbone (DeepSpeed or DDP) feeding a class-sharded head.

    cfg = load_config("configs/tiny_synthetic.yaml", overrides)
    state = setup_distributed(cfg.engine)
    result = Trainer(cfg, state).fit()

One optimizer step = `optim.grad_accum` micro-batches per rank:

    for each micro-batch:  x = backbone.forward(images)            # (B, D), this rank's rows
                           out = head(x, labels)                    # global-batch mean loss
                           backbone.backward(out.loss)              # grads reach x and the head's rows
    lr = schedule(step)
    head_norm = sqrt(all_reduce(head.grad_sq_norm()))              # over the head's shards
    result = backbone.step(lr)                                      # clips, steps (or drops: fp16 overflow)
    head.step(lr * head_lr_scale, grad_scale=clip / loss_scale) if result.applied else head.skip_step()

See engine/distributed_backbone.py for why no other factor appears. Checkpoints go through
`engine.checkpoint.save_checkpoint(trainer, step)` / `load_checkpoint(trainer, path)` (atomic, resumable
mid-epoch and at another world size); SIGTERM/SIGINT/SIGUSR1 stop the loop at a step boundary agreed by
all ranks, save and return (engine/preemption.py); a non-finite loss skips the step.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, save_config
from engine.distributed_backbone import DistributedBackbone, deepspeed_available, set_cpu_threads
from engine.head_inputs import HeadInputs
from engine.metrics import TrainMetrics
from engine.schedules import build_schedule
from parallel.groups import ParallelState, default_backend, default_device, init_parallel

VERSION = "0.1.0"


# ---------------------------------------------------------------------------------------------- setup

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed(engine: str, timeout_s: float = 1800.0) -> ParallelState:
    """Joins the job the launcher started (deepspeed, torchrun), or forms a one-rank job for plain python.

    DeepSpeed needs a process group even alone (without one it tries MPI discovery), so a lone process
    running the deepspeed engine gets a one-rank gloo/nccl group on a free loopback port.
    """
    if engine == "deepspeed" and deepspeed_available() and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if engine == "deepspeed" and deepspeed_available() and not dist.is_initialized():
        device = default_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=default_backend(device), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return init_parallel(timeout_s=timeout_s)


def local_world_size() -> int:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def node_index(state: ParallelState) -> int:
    for key in ("GROUP_RANK", "NODE_RANK", "CROSS_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return state.rank // max(1, local_world_size())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    output_dir: str
    checkpoint: str | None
    tensorboard_dir: str | None
    eval: dict = field(default_factory=dict)
    samples_per_second: float = 0.0


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: Config, state: ParallelState, *, metrics: bool = True):
        from models import build_backbone
        from parallel.heads import build_head

        self.cfg = cfg
        self.state = state
        self.is_main = state.is_main
        if state.device.type == "cpu":
            self.threads = set_cpu_threads(cfg.threads)
        seed_everything(cfg.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.data_dir, self.manifest = self._prepare_data()
        self.num_classes = cfg.data.num_classes or int(self.manifest["num_classes"])
        self.num_images = cfg.data.num_images or int(self.manifest["num_images"])
        data_world = state.data_world
        if data_world > 1 and not cfg.data.resampled:
            raise ConfigError("data.resampled: false gives ranks uneven batch counts (a hang at epoch end); "
                              "set data.resampled: true for more than one rank")

        module = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size, **cfg.model.options)
        self.backbone = DistributedBackbone(module, cfg, state)
        self.head = build_head(cfg.head, state, self.num_classes, cfg.model.embedding_size)
        # what the head needs beyond (x, labels): its sampling mode, a momentum encoder (engine/head_inputs.py)
        self.inputs = HeadInputs(self.head, self.backbone, template_factory=lambda: build_backbone(
            cfg.model.backbone, embedding_size=cfg.model.embedding_size, **cfg.model.options))

        per_step = cfg.data.batch_size * data_world * cfg.optim.grad_accum     # global batch per step
        self.global_batch = per_step
        self.steps_per_epoch = max(1, self.num_images // per_step)
        self.schedule = build_schedule(cfg.schedule, cfg.optim.lr, self.steps_per_epoch)
        self.total_steps = self.schedule.total_steps
        self.loader = self.inputs.build_loader(self._build_loader, cfg.data.mode)

        self.checkpoint_dir = cfg.checkpoint.dir or os.path.join(cfg.output_dir, "checkpoint")
        self.eval_hook = self._build_eval_hook()
        self.metrics = None
        if metrics:
            self.metrics = TrainMetrics(cfg.metrics, rank=state.rank, local_rank=state.local_rank,
                                        node=node_index(state), output_dir=cfg.output_dir,
                                        total_steps=self.total_steps, build_info=self.build_info())
        self.step = 0
        self.timings: dict[str, float] = {}
        if self.is_main:
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            print(f"training {cfg.model.backbone} + {cfg.head.type} head on {self.num_classes} classes, "
                  f"{self.num_images} images: {state.world_size} rank(s) x {cfg.data.batch_size} x "
                  f"{cfg.optim.grad_accum} accumulation = {per_step} per step, {self.total_steps} steps "
                  f"({self.steps_per_epoch} per epoch), engine {self.backbone.kind}, {cfg.precision}", flush=True)
        # -- checkpoints, preemption, failure handling (engine/checkpoint.py, engine/preemption.py) -------
        self.data_position = (0, 0)                 # (epoch, batches of it this rank consumed)
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self.preemption = None
        from engine.checkpoint import resume_path

        resume = resume_path(cfg.checkpoint.resume, self.checkpoint_dir)
        if resume:
            self.load_checkpoint(resume)
        # -- end checkpoints ---------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------ pieces
    def build_info(self) -> dict:
        info = {"version": VERSION, "torch": torch.__version__, "engine": self.backbone.kind,
                "backbone": self.cfg.model.backbone, "head": self.cfg.head.type,
                "precision": self.cfg.precision, "world_size": self.state.world_size}
        if self.backbone.kind == "deepspeed":
            import deepspeed

            info["deepspeed"] = deepspeed.__version__
            info["zero_stage"] = self.backbone.engine.zero_optimization_stage()
        return info

    def _prepare_data(self) -> tuple[str, dict]:
        from engine.data import load_manifest, write_synthetic

        cfg = self.cfg
        data_dir = cfg.data.shards or os.path.join(cfg.output_dir, "data")
        if cfg.synthetic.enabled:
            syn = cfg.synthetic
            marker = os.path.join(data_dir, "train-manifest.json")
            if self.is_main and not os.path.exists(marker):
                print(f"writing synthetic identities to {data_dir}", flush=True)
                write_synthetic(data_dir, syn.num_identities, images_per_identity=syn.images_per_identity,
                                heldout_identities=syn.heldout_identities, heldout_pairs=syn.heldout_pairs,
                                seed=syn.seed, shard_size=syn.shard_size, workers=syn.workers, progress=False)
            if dist.is_initialized():
                dist.barrier()
        manifest = load_manifest(cfg.data.manifest or data_dir)
        return data_dir, manifest

    def _build_loader(self, mode: str | None = None):
        from engine.data import build_loader

        cfg = self.cfg
        return build_loader(self.data_dir, cfg.data.batch_size, num_classes=self.num_classes,
                            rank=self.state.rank if self.state.data_group is not None else 0,
                            world_size=self.state.data_world, num_workers=cfg.data.num_workers,
                            seed=cfg.seed, resampled=cfg.data.resampled,
                            batches_per_epoch=(self.steps_per_epoch * cfg.optim.grad_accum
                                               if cfg.data.resampled else None),
                            shuffle_buffer=cfg.data.shuffle_buffer, mode=mode or cfg.data.mode)

    def _build_eval_hook(self):
        bins = list(self.cfg.eval.bins)
        if not bins and self.cfg.synthetic.enabled:
            heldout = os.path.join(self.data_dir, "heldout.bin")
            if os.path.exists(heldout):
                bins = [heldout]
        if not bins:
            return None
        from engine.evaluation.hook import VerificationHook

        return VerificationHook(bins, self.cfg.eval.every_n_steps, batch_size=self.cfg.eval.batch_size,
                                best_by=self.cfg.eval.best_by or None, log=self._log_eval,
                                channels_last=self.cfg.model.channels_last)

    def _log_eval(self, tag: str, value: float, step: int) -> None:
        if self.metrics is not None and self.metrics.writer is not None:
            self.metrics.writer.add_scalar(tag, value, step)

    def _batches(self):
        # resuming mid-epoch: the epoch's stream is rebuilt from its seed and the batches this rank had
        # consumed are read again (without decoding) and dropped, so the next batch is the one an
        # uninterrupted run gets
        epoch, skip = self.data_position
        try:
            per_epoch = len(self.loader)        # known in resampled mode: a finished epoch is saved as the next
        except TypeError:
            per_epoch = None
        while True:
            self.loader.set_epoch(epoch)
            restore = None
            if skip:        # the skipped batches come back undecoded (engine/checkpoint.py)
                from engine.checkpoint import skip_decoding

                restore = skip_decoding(self.loader, skip)
            produced = 0
            for batch in self.loader:
                produced += 1
                if produced <= skip:
                    if produced == skip and restore is not None:
                        restore()           # the rest of the epoch is decoded as usual
                        restore = None
                    continue
                self.data_position = (epoch + 1, 0) if produced == per_epoch else (epoch, produced)
                yield batch
            if restore is not None:
                restore()
            if produced == 0:
                raise RuntimeError(f"{self.data_dir}: the loader produced no batches for rank {self.state.rank}")
            epoch, skip = epoch + 1, 0
            self.data_position = (epoch, 0)

    # ------------------------------------------------------------------------------------------ one step
    def head_grad_norm(self) -> float:
        """Global L2 norm of the head's pending gradient over all shards (as the head sees it, i.e. still
        carrying the loss scale)."""
        if not hasattr(self.head, "grad_sq_norm"):
            if self.cfg.optim.head_clip_grad_norm > 0:
                raise ConfigError(f"optim.head_clip_grad_norm: head {self.cfg.head.type!r} does not report "
                                  "its gradient norm (grad_sq_norm)")
            return float("nan")
        sq = self.head.grad_sq_norm().detach().to(self.state.device, torch.float64).reshape(1)
        if self.state.head_group is not None and self.state.head_world > 1:
            dist.all_reduce(sq, group=self.state.head_group)
        return float(sq.sqrt())

    def train_step(self, batches) -> dict:
        """One optimizer step over `grad_accum` micro-batches drawn from the iterator `batches`."""
        cfg, device = self.cfg, self.state.device
        t = {"data_wait": 0.0, "backbone_forward": 0.0, "head_forward": 0.0, "backward": 0.0,
             "backbone_step": 0.0, "head_step": 0.0}
        losses, active, samples = [], [], 0
        self.backbone.train(True)
        self.head.train(True)
        for micro in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            item = next(batches)
            t1 = time.perf_counter()
            x, labels, extra, num_images = self.inputs.forward(item, first=micro == 0)   # x (B, D) float32
            _sync(device)
            t2 = time.perf_counter()
            out = self.head(x, labels, extra)
            _sync(device)
            t3 = time.perf_counter()
            loss = float(out.loss.detach())
            if not math.isfinite(loss) and cfg.precision != "fp16":
                # the loss is the same on every rank: all skip this step together (engine/preemption.py)
                from engine.preemption import skip_nonfinite_step

                return skip_nonfinite_step(self, batches, micro, loss, t)
            self.nonfinite["in_a_row"] = 0
            self.backbone.backward(out.loss)
            _sync(device)
            t4 = time.perf_counter()
            t["data_wait"] += t1 - t0
            t["backbone_forward"] += t2 - t1
            t["head_forward"] += t3 - t2
            t["backward"] += t4 - t3
            losses.append(loss)
            samples += num_images
            if "active_classes" in out.stats:
                active.append(float(out.stats["active_classes"]))

        lr = self.schedule(self.step)
        t0 = time.perf_counter()
        head_norm = self.head_grad_norm()
        result = self.backbone.step(lr)
        t1 = time.perf_counter()
        loss_scale = result.loss_scale
        head_norm_true = head_norm / loss_scale
        clip = 1.0
        if cfg.optim.head_clip_grad_norm > 0 and head_norm_true > cfg.optim.head_clip_grad_norm:
            clip = cfg.optim.head_clip_grad_norm / (head_norm_true + 1e-6)
        if result.applied and (math.isfinite(head_norm_true) or not hasattr(self.head, "grad_sq_norm")):
            self.head.step(lr * cfg.optim.head_lr_scale, grad_scale=clip / loss_scale)
        else:
            self.head.skip_step()
        t2 = time.perf_counter()
        t["backbone_step"] = t1 - t0
        t["head_step"] = t2 - t1
        self.step += 1
        self.timings = t
        return {"loss": sum(losses) / len(losses), "lr": lr, "samples": samples,
                "applied": result.applied, "grad_norm_backbone": result.grad_norm,
                "grad_norm_head": head_norm_true, "active_classes": (sum(active) / len(active)) if active else None,
                "timings": t}

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> TrainResult:
        cfg = self.cfg
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        batches = self._batches()
        losses: list[float] = []
        eval_results: dict = {}
        start = time.perf_counter()
        start_step = self.step
        from engine.launch import freeze_setup_objects
        from engine.preemption import Preemption

        freeze_setup_objects()
        self.preemption = Preemption(cfg.checkpoint.grace_period_s).install()
        stop_reason = "final"
        try:
            while self.step < end:
                t0 = time.perf_counter()
                info = self.train_step(batches)
                seconds = time.perf_counter() - t0
                losses.append(info["loss"])
                if self.metrics is not None:
                    self.metrics.record_decode_errors(self.loader.decode_errors())
                    self.metrics.record_step(
                        self.step, samples=info["samples"], global_samples=self.global_batch, seconds=seconds,
                        data_wait=info["timings"]["data_wait"], loss=info["loss"], lr=info["lr"],
                        grad_norms={"backbone": info["grad_norm_backbone"], "head": info["grad_norm_head"]},
                        active_classes=info["active_classes"], skipped=not info["applied"],
                        timings=info["timings"])
                final = self.step == end
                if self.eval_hook is not None:
                    res = self.evaluate(final=final)
                    if res is not None:
                        eval_results = res
                        if self.eval_hook.last_was_best and not final:
                            self.save_checkpoint(reason="best")      # kept by retention
                if self.nonfinite["in_a_row"] >= cfg.checkpoint.max_nonfinite_steps:
                    path = self.save_checkpoint(reason="halted")
                    raise NonFiniteLoss(
                        f"step {self.step}: {self.nonfinite['in_a_row']} non-finite losses in a row "
                        f"({self.nonfinite['total']} in all); halted, checkpoint {path}. Lower optim.lr or enable "
                        "optim.clip_grad_norm / optim.head_clip_grad_norm, then resume from it")
                if not final and self.preemption.should_stop(self.state.device):   # all ranks agree
                    stop_reason = f"stopped by {self.preemption.signal_name}"
                    break
                if cfg.checkpoint.every_n_steps and self.step % cfg.checkpoint.every_n_steps == 0 and not final:
                    self.save_checkpoint()
            checkpoint = self.save_checkpoint(reason=stop_reason)
            if stop_reason != "final" and self.is_main:
                print(f"{stop_reason} at step {self.step}: checkpoint {checkpoint}; resume with "
                      f"--set checkpoint.resume=auto", flush=True)
        finally:
            self.preemption.uninstall()
            elapsed = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.close()
        steps_done = self.step - start_step
        result = TrainResult(steps=self.step, losses=losses, output_dir=cfg.output_dir, checkpoint=checkpoint,
                             tensorboard_dir=self.metrics.tensorboard_dir if self.metrics else None,
                             eval=eval_results,
                             samples_per_second=steps_done * self.global_batch / elapsed if elapsed > 0 else 0.0)
        if self.is_main:
            with open(os.path.join(cfg.output_dir, "result.json"), "w") as f:
                json.dump({"steps": result.steps, "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None, "losses": losses,
                           "eval": eval_results, "checkpoint": checkpoint,
                           "tensorboard_dir": result.tensorboard_dir,
                           "samples_per_second": result.samples_per_second}, f, indent=1)
        return result

    def evaluate(self, final: bool = False) -> dict | None:
        hook = self.eval_hook
        if hook is None or not hook.due(self.step, final):
            return None
        self.backbone.train(False)
        with self.inputs.eval_module() as module:
            res = hook.maybe_run(self.step, module, self.state, final=final)
        self.backbone.train(True)
        if res is not None and self.is_main:
            print("verification at step {}: {}".format(
                self.step, ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.items())), flush=True)
        return res

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str = "periodic") -> str | None:
        """Every rank calls this. Delegates to engine.checkpoint when present; else rank 0 writes the
        backbone's fp32 weights to `<checkpoint dir>/backbone.pt` (atomically)."""
        try:
            from engine import checkpoint as ckpt
        except ImportError:
            ckpt = None
        if ckpt is not None and hasattr(ckpt, "save_checkpoint"):
            return ckpt.save_checkpoint(self, self.step, reason=reason)
        weights = self.backbone.fp32_state_dict()          # collective under ZeRO-3
        path = os.path.join(self.checkpoint_dir, "backbone.pt")
        if self.is_main:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            tmp = path + ".tmp"
            torch.save({"backbone": self.cfg.model.backbone, "embedding_size": self.cfg.model.embedding_size,
                        "step": self.step, "state_dict": weights}, tmp)
            os.replace(tmp, path)
        if dist.is_initialized():
            dist.barrier()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Resumes from `path` through engine.checkpoint (the full-state subsystem)."""
        try:
            from engine import checkpoint as ckpt
        except ImportError:
            ckpt = None
        if ckpt is None or not hasattr(ckpt, "load_checkpoint"):
            raise ConfigError(f"checkpoint.resume: {path}: resuming needs engine.checkpoint, which this "
                              "installation does not have")
        self.step = int(ckpt.load_checkpoint(self, path))


def load_backbone_weights(path: str) -> tuple[str, int, dict]:
    """(backbone name, embedding size, state dict) from a `backbone.pt` written by the trainer."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["backbone"], int(blob["embedding_size"]), blob["state_dict"]


# ---------------------------------------------------------------------------------------------- entry point

def run(config_path: str | None, overrides: list[str] | None = None) -> TrainResult:
    """What `tools/train.py` does: load and validate the recipe, join the job, train, clean up."""
    from engine.config import load_config
    from parallel.groups import shutdown_parallel

    cfg = load_config(config_path, overrides)
    state = setup_distributed(cfg.engine)
    try:
        return Trainer(cfg, state).fit()
    finally:
        shutdown_parallel()
