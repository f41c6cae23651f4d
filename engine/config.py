"""Typed configuration of a training run: dataclasses loaded from YAML, overridable from the command
line (`--set a.b=c`), validated with one-line errors that name the key.

    cfg = load_config("configs/tiny_synthetic.yaml", overrides=["optim.lr=0.05", "head.type=full"])

Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key (and the
file when there is one). The `head:` section is `parallel.heads.config.HeadConfig`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from parallel.heads.config import HeadConfig

ENGINES = ("deepspeed", "ddp")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("polynomial", "cosine", "constant")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = 512
    channels_last: bool = True          # memory format of the backbone and the images (faster on CPU)
    options: dict = field(default_factory=dict)   # passed to models.build_backbone (e.g. gradient_checkpointing)


@dataclass
class DataConfig:
    shards: str = ""                    # directory of shards, a brace pattern (train-{000000..000099}.tar) or a glob
    manifest: str = ""                  # shard-set manifest; empty: look beside the shards
    num_classes: int = 0                # 0: read from the manifest
    num_images: int = 0                 # 0: read from the manifest (sets the length of an epoch)
    batch_size: int = 128               # micro-batch per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True              # shards with replacement, fixed batches per epoch: ranks stay in step
    mode: str = "instance"


@dataclass
class SyntheticDataConfig:
    """Generates synthetic identities into `data.shards` before training when they are missing."""

    enabled: bool = False
    num_identities: int = 200
    images_per_identity: int = 20
    heldout_identities: int = 50
    heldout_pairs: int = 400
    shard_size: int = 1000
    workers: int = 2
    seed: int = 0


@dataclass
class OptimConfig:
    """The backbone's optimizer (the head has its own, in `head.optimizer`). `lr` drives both."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_accum: int = 1                 # micro-batches per optimizer step
    clip_grad_norm: float = 0.0         # backbone global-norm clipping, 0 = off
    head_clip_grad_norm: float = 0.0    # head global-norm clipping over all shards, 0 = off
    head_lr_scale: float = 1.0          # the head's SGD lr = schedule lr x this


@dataclass
class ScheduleConfig:
    """Per-step LR: linear warmup then polynomial (power 1 = linear, insightface) or cosine decay."""

    type: str = "polynomial"
    epochs: float = 20.0
    steps: int = 0                      # >0 overrides epochs (total optimizer steps)
    warmup_epochs: float = 0.0
    warmup_steps: int = 0               # >0 overrides warmup_epochs
    power: float = 1.0
    min_lr: float = 0.0


@dataclass
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero1.json"   # ZeRO setup; batch, precision, clipping are filled in
    zero_stage: int = -1                # >=0 overrides the JSON's zero_optimization.stage


@dataclass
class MetricsConfig:
    prometheus: bool = True
    prometheus_port: int = 9400         # this rank's port = base + local rank
    prometheus_bind: str = "127.0.0.1"
    tensorboard: bool = True
    log_every: int = 10                 # steps between progress lines on rank 0
    progress_bar: bool = False          # tqdm bar instead of periodic lines


@dataclass
class EvalConfig:
    bins: list = field(default_factory=list)    # verification .bin files
    every_n_steps: int = 0              # 0: only at the end
    batch_size: int = 256
    best_by: str = ""


@dataclass
class CheckpointConfig:
    """See engine/checkpoint.py and README "Checkpoints and resuming"."""

    every_n_steps: int = 0              # 0: only at the end
    dir: str = ""                       # empty: <output_dir>/checkpoint
    resume: str = ""                    # a checkpoint (tag dir or checkpoint root), or "auto": <dir>/latest if any
    keep_last: int = 3                  # complete checkpoints kept (plus the best by evaluation); 0 keeps all
    grace_period_s: float = 120.0       # after SIGTERM/SIGINT/SIGUSR1: finish the step, save, exit within this
    max_nonfinite_steps: int = 5        # non-finite losses in a row before the run halts (after saving)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    engine: str = "deepspeed"           # deepspeed | ddp (torch DDP; used when DeepSpeed is missing)
    precision: str = "fp32"
    threads: int = 0                    # torch threads per rank; 0 = cores / ranks on this node
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- building

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Checks `value` against the annotation `tp`; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"{full}: unknown key (allowed here: {allowed})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Sets each `a.b.c=value` (value parsed as YAML) into the raw mapping before it is typed."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is a value, cannot set {'.'.join(path)}")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "") -> Config:
    raw = apply_overrides(copy.deepcopy(raw or {}), overrides)
    try:
        cfg = _build(Config, raw)
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML recipe (or none: defaults), applies `--set` overrides, builds and validates it."""
    raw: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark is not None else ""
                raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(raw, overrides, source=path or "")


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------- validation

def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{key}: {value} must be {'> 0' if strict else '>= 0'}")


def check_backbone(name: str) -> None:
    """Raises ConfigError unless the model registry knows `name` (or one of its aliases)."""
    try:
        from models import resolve_name
    except ImportError:   # models not importable: building the backbone will report it
        return
    try:
        resolve_name(name)
    except ValueError as err:
        raise ConfigError(f"model.backbone: {err}") from None


def validate(cfg: Config) -> None:
    _one_of("engine", cfg.engine, ENGINES)
    _one_of("precision", cfg.precision, PRECISIONS)
    _one_of("optim.optimizer", cfg.optim.optimizer, OPTIMIZERS)
    _one_of("schedule.type", cfg.schedule.type, SCHEDULES)
    _positive("model.embedding_size", cfg.model.embedding_size)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("data.num_workers", cfg.data.num_workers, strict=False)
    _positive("data.num_classes", cfg.data.num_classes, strict=False)
    _positive("optim.lr", cfg.optim.lr, strict=False)
    _positive("optim.grad_accum", cfg.optim.grad_accum)
    _positive("optim.weight_decay", cfg.optim.weight_decay, strict=False)
    _positive("optim.clip_grad_norm", cfg.optim.clip_grad_norm, strict=False)
    _positive("optim.head_clip_grad_norm", cfg.optim.head_clip_grad_norm, strict=False)
    _positive("optim.head_lr_scale", cfg.optim.head_lr_scale)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas!r}")
    _positive("schedule.epochs", cfg.schedule.epochs, strict=False)
    _positive("schedule.steps", cfg.schedule.steps, strict=False)
    _positive("schedule.warmup_steps", cfg.schedule.warmup_steps, strict=False)
    _positive("schedule.warmup_epochs", cfg.schedule.warmup_epochs, strict=False)
    _positive("schedule.power", cfg.schedule.power)
    if cfg.schedule.steps == 0 and cfg.schedule.epochs == 0:
        raise ConfigError("schedule.steps: one of schedule.steps or schedule.epochs must be > 0")
    if cfg.schedule.steps and cfg.schedule.warmup_steps >= cfg.schedule.steps:
        raise ConfigError(f"schedule.warmup_steps: {cfg.schedule.warmup_steps} must be < schedule.steps "
                          f"({cfg.schedule.steps})")
    if cfg.schedule.warmup_epochs and cfg.schedule.epochs and cfg.schedule.warmup_epochs >= cfg.schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs: {cfg.schedule.warmup_epochs} must be < schedule.epochs "
                          f"({cfg.schedule.epochs})")
    if cfg.schedule.min_lr > cfg.optim.lr:
        raise ConfigError(f"schedule.min_lr: {cfg.schedule.min_lr} is above optim.lr ({cfg.optim.lr})")
    if cfg.deepspeed.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} is not one of -1, 0, 1, 2, 3")
    if cfg.engine == "ddp" and cfg.precision == "fp16":
        raise ConfigError("precision: fp16 needs engine: deepspeed (its dynamic loss scaler); use bf16 or fp32 "
                          "with engine: ddp")
    if not 0 < cfg.metrics.prometheus_port < 65536:
        raise ConfigError(f"metrics.prometheus_port: {cfg.metrics.prometheus_port} is not a TCP port")
    _positive("metrics.log_every", cfg.metrics.log_every)
    _positive("eval.every_n_steps", cfg.eval.every_n_steps, strict=False)
    _positive("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps, strict=False)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last, strict=False)
    _positive("checkpoint.grace_period_s", cfg.checkpoint.grace_period_s, strict=False)
    _positive("checkpoint.max_nonfinite_steps", cfg.checkpoint.max_nonfinite_steps)
    if cfg.synthetic.enabled:
        _positive("synthetic.num_identities", cfg.synthetic.num_identities)
        _positive("synthetic.images_per_identity", cfg.synthetic.images_per_identity)
    elif not cfg.data.shards:
        raise ConfigError("data.shards: no training shards given (set data.shards or synthetic.enabled)")
    try:
        cfg.head.validate("head")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_backbone(cfg.model.backbone)
