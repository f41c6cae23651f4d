"""The data-parallel backbone: one interface over a DeepSpeed engine (ZeRO 0-3, optional CPU offload,
fp32/bf16/fp16) and torch DDP, so the trainer's loop is the same for both.

Per optimizer step of k = `grad_accum` micro-batches the trainer calls

    for each micro-batch:  x = backbone.forward(images); loss = head(x, y).loss; backbone.backward(loss)
    result = backbone.step(lr)        # StepResult(applied, grad_norm, loss_scale)
    head.step(lr, grad_scale=1 / result.loss_scale) if result.applied else head.skip_step()

Scaling, as pinned for deepspeed==0.19.8 (tests/test_engine_scaling.py proves each line):
- `engine.backward(loss)` divides the loss by k once (`scale_wrt_gas`) before autograd runs; the output
  hooks that divide in torch-style backward see the graph registered and do not divide again. So the
  gradients that reach the head (outside the engine) are the mean over micro-batches as well, which is
  what a k-times larger batch gives: no extra factor for the head.
- fp16: ZeRO and the fp16 optimizer multiply the loss by the dynamic loss scale before autograd, so the
  head's gradients carry that factor too; `loss_scale` is that factor (the head's step multiplies its
  gradient by `grad_scale`, so the trainer passes 1 / loss_scale, times its clipping coefficient).
  A step the loss scaler drops (overflow) returns `applied=False` and the trainer drops the head's step.
- Data parallel: both DeepSpeed and DDP average backbone gradients over the data-parallel group; the head
  multiplies the gradient it sends into x by that group's size, so the average is the global-batch
  gradient. Nothing here rescales for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VERIFIED_DEEPSPEED = "0.19.8"    # the version whose backward/step semantics this module relies on


def state_is_main(state) -> bool:
    return getattr(state, "rank", 0) == 0


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class StepResult:
    applied: bool                 # False: the backbone's optimizer dropped this step (fp16 overflow)
    grad_norm: float | None       # global backbone gradient norm before clipping (None if unknown)
    loss_scale: float             # factor the gradients that reached the head carry (fp16 loss scale, else 1)


def build_optimizer(params, optim_cfg, *, offload: bool = False):
    """The backbone's optimizer. AdamW with CPU offload uses DeepSpeedCPUAdam (JIT-built once)."""
    params = [p for p in params if p.requires_grad]
    if optim_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                weight_decay=optim_cfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay)


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(grads).norm())


def deepspeed_config(cfg, data_world: int) -> dict:
    """The JSON named by `deepspeed.config` (the ZeRO setup) with batch, accumulation, precision and
    clipping filled in from the recipe, so the recipe is the one place those live."""
    path = cfg.deepspeed.config
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"deepspeed.config: {path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed.config: {path} is not valid JSON ({err})") from None
    ds = dict(ds)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.optim.grad_accum * data_world
    ds["gradient_clipping"] = float(cfg.optim.clip_grad_norm)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)   # torch SGD/AdamW are fine under ZeRO
    fp16 = dict(ds.get("fp16", {}))
    fp16["enabled"] = cfg.precision == "fp16"
    ds["fp16"] = fp16
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    if cfg.precision in ("bf16", "fp16"):
        # DeepSpeed >= 0.19 casts parameters only; BatchNorm's running statistics must follow them
        ds["data_types"] = {**ds.get("data_types", {})}
        ds["data_types"].setdefault("buffer_dtype", cfg.precision)
    zero = dict(ds.get("zero_optimization", {"stage": 0}))
    if cfg.deepspeed.zero_stage >= 0:
        zero["stage"] = cfg.deepspeed.zero_stage
    ds["zero_optimization"] = zero
    if offloads_optimizer(ds) and cfg.optim.optimizer == "sgd":
        ds["zero_force_ds_cpu_optimizer"] = False   # plain SGD runs fine on the offloaded fp32 partitions
    ds.pop("optimizer", None)                       # the recipe's optimizer is passed in, never the JSON's
    ds.pop("scheduler", None)                       # the trainer sets the lr every step
    return ds


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    return off.get("device", "none") == "cpu"


class DistributedBackbone:
    """Backbone + its optimizer under DeepSpeed or DDP. `module` is the plain backbone."""

    def __init__(self, module: nn.Module, cfg, state, *, engine: str | None = None):
        self.cfg = cfg
        self.state = state
        self.grad_accum = cfg.optim.grad_accum
        self.precision = cfg.precision
        self.channels_last = cfg.model.channels_last
        self.kind = engine or cfg.engine
        if self.kind == "deepspeed" and not deepspeed_available():
            self.kind = "ddp"
        self._micro = 0
        self._sync_ctx = None
        # channels_last: under DeepSpeed for the images only (a conv with a channels_last input runs the
        # channels_last kernels, measured as fast as converting the weights too, and DeepSpeed's parameter
        # broadcast/flattening needs contiguous parameters); under DDP for the weights as well.
        module = module.to(state.device)
        if self.kind == "deepspeed":
            self._init_deepspeed(module)
        else:
            self._init_ddp(module)

    # ------------------------------------------------------------------------------------------ setup
    def _init_deepspeed(self, module):
        import deepspeed

        if deepspeed.__version__ != VERIFIED_DEEPSPEED and state_is_main(self.state):
            warnings.warn(f"deepspeed {deepspeed.__version__}: the gradient-accumulation and loss-scale handling "
                          f"was verified for {VERIFIED_DEEPSPEED} (tests/test_engine_scaling.py); run those tests",
                          stacklevel=2)

        self.ds_config = deepspeed_config(self.cfg, self.state.data_world)
        self.optimizer = build_optimizer(module.parameters(), self.cfg.optim, offload=offloads_optimizer(self.ds_config))
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=self.ds_config)
        self.module = self.engine.module
        self.input_dtype = PRECISION_DTYPES[self.precision]

    def _init_ddp(self, module):
        if self.channels_last:   # DDP's gradient buckets follow the parameters' layout: match the grads'
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.optimizer = build_optimizer(module.parameters(), self.cfg.optim)
        self.model = module
        if self.state.data_group is not None and self.state.data_world > 1:
            device_ids = [self.state.device.index] if self.state.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                             process_group=self.state.data_group)
        self.input_dtype = torch.float32

    # ------------------------------------------------------------------------------------------ per micro-batch
    @property
    def is_boundary(self) -> bool:
        """Whether the current micro-batch is the last of its optimizer step."""
        return (self._micro + 1) % self.grad_accum == 0

    def train(self, mode: bool = True):
        self.module.train(mode)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.state.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.dtype != self.input_dtype:
            images = images.to(self.input_dtype)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) -> embeddings x (B,D) float32."""
        images = self.prepare_images(images)
        if self.kind == "deepspeed":
            return self.engine(images).float()
        if self.model is not self.module and not self.is_boundary:
            self._sync_ctx = self.model.no_sync()
            self._sync_ctx.__enter__()
        if self.precision == "bf16":
            with torch.autocast(self.state.device.type, dtype=torch.bfloat16):
                out = self.model(images)
        else:
            out = self.model(images)
        return out.float()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (the mean over its global micro-batch)."""
        if self.kind == "deepspeed":
            self._loss_scale = self.loss_scale()
            self.engine.backward(loss)
            if not self.engine.is_gradient_accumulation_boundary():
                self.engine.step()      # a micro-step: only advances DeepSpeed's accumulation counter
        else:
            (loss / self.grad_accum).backward()
            if self._sync_ctx is not None:
                self._sync_ctx.__exit__(None, None, None)
                self._sync_ctx = None
        self._micro += 1

    def loss_scale(self) -> float:
        """The factor DeepSpeed's loss scaler multiplies the loss by in backward (1 without fp16)."""
        if self.kind != "deepspeed" or self.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(opt, attr, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
        return float(opt.loss_scaler.cur_scale)

    # ------------------------------------------------------------------------------------------ per step
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, lr: float) -> StepResult:
        """Applies the optimizer step that ends the current accumulation window."""
        if self._micro % self.grad_accum != 0:
            raise RuntimeError(f"backbone.step after {self._micro % self.grad_accum} of {self.grad_accum} "
                               "micro-batches")
        self.set_lr(lr)
        if self.kind == "deepspeed":
            return self._step_deepspeed()
        return self._step_ddp()

    def _step_deepspeed(self) -> StepResult:
        engine = self.engine
        scale = getattr(self, "_loss_scale", 1.0)
        norm = None
        if not engine.zero_optimization() and self.precision == "fp32":
            norm = _grad_norm(engine.module.parameters())   # stage 0: reduced grads live in .grad
        skipped_before = engine.skipped_steps
        engine.step()
        applied = engine.skipped_steps == skipped_before
        if norm is None:
            ds_norm = engine.get_global_grad_norm()
            if ds_norm is not None:
                norm = float(ds_norm.item() if torch.is_tensor(ds_norm) else ds_norm)
                if self.precision == "fp16" and not engine.zero_optimization():
                    norm = norm / scale if scale else norm
        return StepResult(applied=applied, grad_norm=norm, loss_scale=scale)

    def _step_ddp(self) -> StepResult:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.clip_grad_norm
        if max_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            norm = _grad_norm(params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied=True, grad_norm=norm, loss_scale=1.0)

    # ------------------------------------------------------------------------------------------ state
    def fp32_state_dict(self) -> dict:
        """The backbone's weights as fp32 tensors (gathered from ZeRO-3 partitions when needed)."""
        if self.kind == "deepspeed" and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in self.module.state_dict().items()}

    @contextlib.contextmanager
    def gathered(self):
        """Context in which `module` holds full weights (ZeRO-3 gathers them) for evaluation."""
        if self.kind == "deepspeed" and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def set_cpu_threads(threads: int = 0) -> int:
    """Gives each rank of this node its share of the cores (2 cores, 2 ranks: 1 thread each)."""
    if threads <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    return threads
