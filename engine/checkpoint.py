"""Checkpoints that survive kills and resume anywhere: mid-epoch, and at another world size.

Layout (`checkpoint.dir`, DeepSpeed's tag-directory convention):

    <dir>/latest                          the tag of the newest complete checkpoint (written last)
    <dir>/step_00001200/                  one checkpoint (tag = step)
        manifest.json                     what the run was: classes, D, head, world size and class
                                          ranges at save time, step, epoch, data position per rank,
                                          config, code version, and every file with size and CRC-32
        backbone_state.pt                 fp32 weights + the optimizer's per-parameter state by name
                                          (+ loss-scaler state): independent of the world size
        backbone.pt                       the fp32 weights alone (engine/export.py, evaluation tools)
        mp_rank_00_model_states.pt, ...   DeepSpeed's own `save_checkpoint` files (engine: deepspeed),
                                          kept for DeepSpeed's tools (zero_to_fp32 and the like)
        head-rank00000.pt ...             one file per rank of the head group: its class range's rows,
                                          optimizer state and queues (see "Head state" below)
        train-rank00000.pt ...            per rank: RNG states, data position, skip counters
        ema.pt                            the momentum encoder (heads that need one)

Atomicity. Every file is written to `<name>.tmp`, flushed, fsynced and renamed; the whole checkpoint
is written into `<tag>.partial/`; after every rank reported success (an all-reduce), rank 0 writes the
manifest, renames the directory to `<tag>` and only then replaces `latest` (temp file, fsync, rename,
fsync of the directory). A kill at any instant leaves `latest` naming a complete checkpoint; a
leftover `*.partial` directory is removed by the next save.

Head state. `head.sharded_state()` of a parametric head (full, partial, mutual) holds `class_start`,
`class_count`, per-class tensors (first dimension = class_count: rows, momentum, int8 momentum
scales, hard queues and scores) and rank-local RNG states; the per-class tensors of all files are
conceptually concatenated by class id and sliced by the new `ClassShard` ranges when the world size
changes (each rank reads only the files that overlap its range, memory-mapped). Heads whose state is
keyed (DCQ queue entries by FIFO position, F2C pool slots by identity) expose `merge_states`; at
another world size every rank loads the union and keeps its share (the head's own rule). At the same
world size every rank loads its own file unchanged (bit-exact resume).

Resuming mid-epoch. The loader is a deterministic function of (seed, epoch, rank, worker); the trainer
records (epoch, batches consumed) and a resumed run rebuilds the epoch's stream and fast-forwards past
the consumed batches (their tar bytes are read again, their images are not decoded: `skip_decoding`). RNG states (python, numpy, torch, the head's samplers and its stochastic-rounding
stream) are restored, so an interrupted run continues bit-for-bit at the same world size on CPU.

Everything read back goes through `torch.load(..., weights_only=True)`; DeepSpeed's own files, which
pickle Python objects, are written for DeepSpeed's tools but never read here.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist

from parallel.sharding import ClassShard

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL = ".partial"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
BACKBONE_FILE = "backbone_state.pt"
EXPORT_FILE = "backbone.pt"
EMA_FILE = "ema.pt"
RANK_LOCAL_KEYS = ("generator", "rounding_generator")   # head-state entries that belong to a rank, not a class
FAULT_ENV = "SHARDFACE_CHECKPOINT_FAULT"                # tests only: see _fault


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupt, or from another model."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def head_file(rank: int) -> str:
    return f"head-rank{rank:05d}.pt"


def train_file(rank: int) -> str:
    return f"train-rank{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------- files

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def atomic_save(obj, path: str) -> dict:
    """torch.save to `<path>.tmp`, flush, fsync, rename. Returns {"size", "crc32"} of the file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": os.path.getsize(path), "crc32": _crc32(path)}


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def safe_load(path: str, *, mmap: bool = False):
    """torch.load with weights_only=True; any failure is a CheckpointError naming the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, disallowed global: all corrupt
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None


class InjectedCrash(BaseException):
    """Raised by the `raise` fault action: the save stops where a kill would have stopped it."""


def _fault(stage: str, rank: int, step: int) -> None:
    """Fault injection for the tests, from SHARDFACE_CHECKPOINT_FAULT="stage=<name>,action=<sleep|crash|
    raise>[,seconds=<s>][,rank=<r>][,step=<n>]": at that stage of the save (after_backbone, after_head,
    before_manifest, before_rename, before_latest) the rank sleeps (a test kills it there), exits at
    once (os._exit), or raises InjectedCrash (in-process tests)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    opts = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if opts.get("stage") != stage or ("rank" in opts and int(opts["rank"]) != rank) \
            or ("step" in opts and int(opts["step"]) != step):
        return
    action = opts.get("action", "crash")
    print(f"checkpoint fault injection: rank {rank} {action} at {stage} (step {step})", flush=True)
    if action == "sleep":
        time.sleep(float(opts.get("seconds", 60)))
    elif action == "raise":
        raise InjectedCrash(f"{stage} (step {step})")
    else:
        os._exit(17)


# ---------------------------------------------------------------------------------------------- head state

def split_head_state(state: dict) -> dict:
    """A head's `sharded_state()` as {"layout": "class_range"|"keyed", ...} (see module docstring)."""
    if "class_start" in state and "class_count" in state:
        count = int(state["class_count"])
        per_class, local = {}, {}
        for key, value in state.items():
            if key in ("class_start", "class_count"):
                continue
            if key not in RANK_LOCAL_KEYS and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == count:
                per_class[key] = value.detach().cpu()
            else:
                local[key] = value.detach().cpu() if torch.is_tensor(value) else value
        return {"layout": "class_range", "class_start": int(state["class_start"]), "class_count": count,
                "per_class": per_class, "local": local}
    return {"layout": "keyed", "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                         for k, v in state.items()}}


def head_meta(head) -> dict:
    return {"type": getattr(head, "name", type(head).__name__), "num_classes": int(head.num_classes),
            "embedding_size": int(head.embedding_size)}


def save_head_shard(head, path: str) -> dict:
    """Writes this rank's head state (atomically); returns the manifest entry of the file."""
    parts = split_head_state(head.sharded_state())
    blob = {"format": FORMAT_VERSION, **head_meta(head), **parts}
    info = atomic_save(blob, path)
    entry = {"file": os.path.basename(path), "layout": parts["layout"], **info}
    if parts["layout"] == "class_range":
        entry.update(class_start=parts["class_start"], class_count=parts["class_count"])
    return entry


def _check_head_blob(blob: dict, path: str, head) -> None:
    meta = head_meta(head)
    for key, value in meta.items():
        if blob.get(key) != value:
            raise CheckpointError(f"{path}: head {key} is {blob.get(key)!r}, this run has {value!r}")


def gather_class_range(files: list[dict], directory: str, start: int, count: int, head=None) -> dict:
    """{name: tensor (count, ...)}: the per-class tensors of classes [start, start + count) concatenated by
    class id from the head files that overlap the range (memory-mapped; only those files are opened).
    With `head`, each file's head type, num_classes and D are checked against it."""
    pieces: dict[str, list[torch.Tensor]] = {}
    covered = start
    for entry in sorted(files, key=lambda e: e["class_start"]):
        lo, n = entry["class_start"], entry["class_count"]
        a, b = max(lo, start), min(lo + n, start + count)
        if a >= b:
            continue
        if a != covered:
            raise CheckpointError(f"{directory}: no head file holds classes [{covered}, {a})")
        path = os.path.join(directory, entry["file"])
        blob = safe_load(path, mmap=True)
        if head is not None:
            _check_head_blob(blob, path, head)
        if blob.get("layout") != "class_range" or blob["class_start"] != lo or blob["class_count"] != n:
            raise CheckpointError(f"{path}: holds classes [{blob.get('class_start')}, +{blob.get('class_count')}), "
                                  f"the manifest says [{lo}, +{n})")
        for key, value in blob["per_class"].items():
            pieces.setdefault(key, []).append(value[a - lo:b - lo])
        covered = b
    if covered != start + count:
        raise CheckpointError(f"{directory}: no head file holds classes [{covered}, {start + count})")
    lengths = {k: len(v) for k, v in pieces.items()}
    if len(set(lengths.values())) > 1:
        raise CheckpointError(f"{directory}: head files disagree on their per-class entries ({lengths})")
    return {k: torch.cat(v) for k, v in pieces.items()}


def load_head_shards(head, directory: str, files: list[dict], rank: int, world_size: int,
                     saved_world: int) -> None:
    """Loads the head from the files of a checkpoint saved with `saved_world` ranks into this rank
    (`rank` of `world_size`), re-slicing by class id when the world size differs."""
    if not files:
        raise CheckpointError(f"{directory}: the manifest lists no head files")
    if len(files) != saved_world:
        raise CheckpointError(f"{directory}: {len(files)} head files for a head group of {saved_world} ranks")
    layout = files[0]["layout"]
    expected = split_head_state(head.sharded_state())
    if expected["layout"] != layout:
        raise CheckpointError(f"{directory}: head state is {layout!r}, the {head.name} head keeps {expected['layout']!r}")
    same_world = saved_world == world_size
    if layout == "keyed":
        state = None
        if same_world:
            path = os.path.join(directory, files[rank]["file"])
            blob = safe_load(path)
            _check_head_blob(blob, path, head)
            state = blob["state"]
            if state.get("layout") == "replicated" and world_size > 1:
                state = None     # each rank saved a disjoint share of a replicated memory: load the union
        if state is None:
            merge = getattr(type(head), "merge_states", None)
            if merge is None:
                raise CheckpointError(f"{directory}: the {head.name} head cannot merge keyed state across world sizes")
            states = []
            for entry in files:
                path = os.path.join(directory, entry["file"])
                blob = safe_load(path)
                _check_head_blob(blob, path, head)
                states.append(blob["state"])
            state = merge(states)
        try:
            head.load_sharded_state(state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{directory}: head state does not fit this head ({err})") from None
        return
    start, count = int(expected["class_start"]), int(expected["class_count"])
    per_class = gather_class_range(files, directory, start, count, head)
    if set(per_class) != set(expected["per_class"]):
        raise CheckpointError(f"{directory}: head files hold {sorted(per_class)}, the {head.name} head keeps "
                              f"{sorted(expected['per_class'])} (another head configuration?)")
    for key, value in per_class.items():
        want = expected["per_class"][key]
        if value.dtype != want.dtype or tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(f"{directory}: head entry {key!r} is {value.dtype} {tuple(value.shape)}, this run "
                                  f"keeps {want.dtype} {tuple(want.shape)} for classes [{start}, {start + count})")
    state = {"class_start": start, "class_count": count, **per_class}
    if same_world:   # the rank-local streams continue exactly where they were
        entry = files[rank]
        if (entry["class_start"], entry["class_count"]) != (start, count):
            raise CheckpointError(f"{directory}: {entry['file']} holds classes [{entry['class_start']}, "
                                  f"+{entry['class_count']}), this rank owns [{start}, +{count})")
        blob = safe_load(os.path.join(directory, entry["file"]), mmap=True)
        state.update(blob["local"])
    head.load_sharded_state(state)


def merge_head_files(directory: str, files: list[dict]) -> dict:
    """The whole head of a checkpoint as one state: per-class tensors over all classes (class_range
    layout) or the heads' keyed tables concatenated (keyed layout)."""
    layout = files[0]["layout"]
    if layout == "class_range":
        total = sum(e["class_count"] for e in files)
        return {"layout": layout, "class_start": 0, "class_count": total,
                "per_class": gather_class_range(files, directory, 0, total), "local": {}}
    states = [safe_load(os.path.join(directory, e["file"]))["state"] for e in files]
    keys = [k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() >= 1]
    merged = {k: v for k, v in states[0].items() if k not in keys}
    merged.update({k: torch.cat([s[k] for s in states]) for k in keys})
    merged["world_size"] = None
    for counter in ("next_position", "commits"):
        if counter in merged:
            merged[counter] = max(int(s[counter]) for s in states)
    return {"layout": layout, "state": merged}


def reslice_head_files(directory: str, files: list[dict], world_size: int) -> list[dict]:
    """Per-class head state of a class-range checkpoint split into `world_size` blobs by ClassShard."""
    if files[0]["layout"] != "class_range":
        raise CheckpointError(f"{directory}: keyed head state (dcq, f2c) is re-dealt by the head at load time; "
                              "offline resharding applies to class-range heads")
    num_classes = sum(e["class_count"] for e in files)
    out = []
    for r in range(world_size):
        shard = ClassShard(num_classes, world_size, r)
        out.append({"layout": "class_range", "class_start": shard.start, "class_count": shard.count,
                    "per_class": gather_class_range(files, directory, shard.start, shard.count), "local": {}})
    return out


# ---------------------------------------------------------------------------------------------- data position

class SkipDecoder:
    """The loader's image decoder for a fast-forward: a worker's first `calls[worker]` images come back
    blank (no JPEG decode; the flip draws from the worker's random stream happen as before), the rest
    from the real decoder."""

    def __init__(self, real, calls: list[int], size: int):
        self.real, self.calls, self.size = real, calls, size
        self.used = 0

    def __call__(self, data):
        info = torch.utils.data.get_worker_info()
        if self.used < self.calls[info.id if info is not None else 0]:
            self.used += 1
            return np.zeros((self.size, self.size, 3), np.uint8)
        return self.real(data)


def skip_decoding(loader, batches: int):
    """Makes the next epoch of `loader` (a ShardLoader, or a loader holding `identity`/`instance` ones)
    hand out its first `batches` batches without decoding their images; the trainer drops them.
    Returns a function that puts the real decoders back (call it when that epoch ends), or None.

    Batch i of an epoch comes from worker i mod num_workers (the DataLoader takes them in turn), so worker
    w skips its first ceil((batches - w) / num_workers) batches. That holds while every worker still has
    batches: always in resampled mode, and with one worker; a finite-mode loader with several workers
    decodes what it skips. Assumes the skipped batches decoded without error when they were first read
    (an undecodable image then shifted the later samples by one)."""
    from engine.data.loader import IMAGE_SIZE, ShardLoader

    loaders = [loader] if isinstance(loader, ShardLoader) else \
        [getattr(loader, name, None) for name in ("identity", "instance")]
    undo = []
    for item in loaders:
        if not isinstance(item, ShardLoader):
            continue
        stream, workers = item.stream, max(1, item.num_workers)
        if workers > 1 and not stream.resampled:
            continue
        per_batch = stream.batch_size * (1 if stream.mode == "instance" else 2)
        calls = [(batches // workers + (w < batches % workers)) * per_batch for w in range(workers)]
        undo.append((stream, stream.decoder))
        stream.decoder = SkipDecoder(stream.decoder, calls, IMAGE_SIZE)
    if not undo:
        return None

    def restore():
        for stream, decoder in undo:
            stream.decoder = decoder
    return restore


# ---------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": {"bit_generator": np_state["bit_generator"],
                     "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                     "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                     "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------- backbone

def _zero_base_optimizer(backbone):
    """(ZeRO optimizer, its wrapped torch optimizer) under DeepSpeed ZeRO, else (None, None)."""
    if backbone.kind != "deepspeed":
        return None, None
    opt = backbone.engine.optimizer
    base = getattr(opt, "optimizer", None)
    if base is None or not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")
                               for p in backbone.module.parameters()):
        return None, None
    return opt, base


def backbone_state(backbone) -> dict:
    """World-size independent backbone state: fp32 weights and the optimizer's per-parameter state by
    parameter name (gathered from ZeRO partitions: collective, every rank calls it)."""
    weights = backbone.fp32_state_dict()
    names = [n for n, p in backbone.module.named_parameters() if p.requires_grad]
    params = dict(backbone.module.named_parameters())
    per_param: dict[str, dict] = {n: {} for n in names}
    scalars: dict = {}
    zero_opt, base = _zero_base_optimizer(backbone)
    if zero_opt is None:
        opt = backbone.optimizer           # the torch optimizer (DeepSpeed stage 0 fp32 steps it as it is)
        for n in names:
            for key, value in opt.state.get(params[n], {}).items():
                per_param[n][key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        if len(opt.state) > sum(1 for n in names if params[n] in opt.state):
            # e.g. DeepSpeed's fp16 optimizer without ZeRO keeps its state on master copies
            raise CheckpointError("the backbone optimizer keeps state on tensors other than the model's parameters "
                                  "(DeepSpeed fp16 without ZeRO?): use a ZeRO stage >= 1 or engine: ddp")
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keys, scalar_keys = set(), {}
        for state in base.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    keys.add(key)
                else:
                    scalar_keys[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        # every rank must take part in the gathers in the same order
        keys_list = [sorted(keys)]
        if dist.is_initialized():
            dist.broadcast_object_list(keys_list, src=0)
        for n in names:
            p = params[n]
            weights[n] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for key in keys_list[0]:
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    per_param[n][key] = value.detach().float().cpu().clone()
        scalars = scalar_keys
    groups = []
    for g in backbone.optimizer.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, tuple, list))})
    out = {"format": FORMAT_VERSION, "weights": weights, "optimizer_state": per_param,
           "optimizer_scalars": scalars, "param_groups": groups, "loss_scaler": _loss_scaler_state(backbone)}
    if backbone.kind == "deepspeed":
        eng = backbone.engine
        out["engine_counters"] = {"global_steps": int(eng.global_steps), "global_samples": int(eng.global_samples),
                                  "skipped_steps": int(eng.skipped_steps), "micro_steps": int(eng.micro_steps)}
    return out


LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler_state(backbone) -> dict:
    if backbone.kind != "deepspeed":
        return {}
    scaler = getattr(backbone.engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    out = {}
    for field in LOSS_SCALER_FIELDS:
        value = getattr(scaler, field, None)
        if value is not None:
            out[field] = float(value) if field == "cur_scale" else int(value)
    return out


def load_backbone_state(backbone, blob: dict, path: str) -> None:
    """Restores weights, optimizer state, loss scaler and engine counters from `backbone_state`
    output, at any data-parallel world size (every rank calls it)."""
    params = dict(backbone.module.named_parameters())
    weights = blob["weights"]
    module_keys = set(backbone.module.state_dict())
    if set(weights) != module_keys:
        missing, extra = sorted(module_keys - set(weights)), sorted(set(weights) - module_keys)
        raise CheckpointError(f"{path}: backbone weights do not match this model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for name, value in weights.items():
        if name in params and tuple(params[name].shape) != tuple(value.shape) and not hasattr(params[name], "ds_shape"):
            raise CheckpointError(f"{path}: backbone parameter {name!r} is {tuple(value.shape)}, this model has "
                                  f"{tuple(params[name].shape)}")
    zero_opt, base = _zero_base_optimizer(backbone)
    with torch.no_grad():
        if zero_opt is None:
            state = backbone.module.state_dict()
            backbone.module.load_state_dict({k: v.to(state[k].dtype) for k, v in weights.items()})
            opt = backbone.optimizer
            for n, entries in blob["optimizer_state"].items():
                if entries:
                    p = params[n]
                    opt.state[p] = {k: (v.to(p.device, p.dtype) if torch.is_tensor(v) and v.dim() > 0
                                        else (v.clone() if torch.is_tensor(v) else v)) for k, v in entries.items()}
        else:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            if backbone.engine.zero_optimization_stage() == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    if dist.get_rank() == 0 if dist.is_initialized() else True:
                        backbone.module.load_state_dict({k: v for k, v in weights.items()}, strict=False)
            else:
                state = backbone.module.state_dict()
                backbone.module.load_state_dict({k: v.to(state[k].dtype) for k, v in weights.items()})
            keys = sorted({k for entries in blob["optimizer_state"].values() for k in entries})
            # the optimizer has not stepped yet after a restart: create its state, then link DeepSpeed's views
            # the flat fp32 partitions the wrapped optimizer steps (ZeRO-3 attaches them only during its step)
            flats = list(getattr(zero_opt, "fp32_partitioned_groups_flat", None) or
                         [flat for group in base.param_groups for flat in group["params"]])
            for flat in flats:
                st = base.state.setdefault(flat, {})
                for key in keys:
                    st.setdefault(key, torch.zeros_like(flat))
                for key, value in blob["optimizer_scalars"].items():
                    st[key] = value.clone() if torch.is_tensor(value) else value
            if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):     # DeepSpeed's per-parameter views
                zero_opt._hp_optimizer_states_linked = False
                zero_opt._lazy_init_hp_params_optimizer_state()
            for n, p in params.items():
                if n not in blob["optimizer_state"]:
                    continue
                safe_set_full_fp32_param(p, weights[n].to(p.device))
                for key, value in blob["optimizer_state"][n].items():
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
    scaler = getattr(backbone.engine.optimizer, "loss_scaler", None) if backbone.kind == "deepspeed" else None
    for field, value in blob.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, field):
            setattr(scaler, field, value)
    if backbone.kind == "deepspeed" and "engine_counters" in blob:
        for field, value in blob["engine_counters"].items():
            setattr(backbone.engine, field, value)


# ---------------------------------------------------------------------------------------------- saving

def code_version() -> dict:
    from engine.trainer import VERSION

    out = {"version": VERSION, "torch": torch.__version__}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out["git"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def _all_ok(ok: bool, device) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _tag_step(tag: str | None) -> int:
    match = TAG_PATTERN.match(tag or "")
    return int(match.group(1)) if match else -1


def checkpoint_tags(directory: str) -> list[str]:
    """Complete checkpoints in `directory` (tag dirs with a manifest), oldest first."""
    if not os.path.isdir(directory):
        return []
    tags = [t for t in os.listdir(directory) if TAG_PATTERN.match(t)
            and os.path.exists(os.path.join(directory, t, MANIFEST))]
    return sorted(tags, key=lambda t: int(TAG_PATTERN.match(t).group(1)))


def save_checkpoint(trainer, step: int, *, reason: str = "periodic") -> str:
    """Every rank calls this at the same step. Returns the checkpoint directory (`<dir>/<tag>`)."""
    errors = getattr(trainer.head, "errors", None)
    if errors is not None:  # input errors still on their way from the device are raised before anything is saved
        errors.raise_ready(wait=True)
    state = trainer.state
    rank, world = state.rank, state.world_size
    root = os.path.abspath(trainer.checkpoint_dir)
    tag = tag_for_step(step)
    final = os.path.join(root, tag)
    partial = final + PARTIAL
    t0 = time.perf_counter()
    exists = [os.path.exists(os.path.join(final, MANIFEST))]     # this step is saved already (halt, signal)
    if dist.is_initialized():
        dist.broadcast_object_list(exists, src=0)
    if exists[0]:       # complete already (a stop at a periodic step, or saved before a kill that beat `latest`)
        if rank == 0 and read_latest(root) != tag and _tag_step(read_latest(root)) < step:
            atomic_write_text(os.path.join(root, LATEST), tag)
        _barrier()
        return final
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):                 # leftovers of interrupted saves
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.exists(final):                     # a directory without manifest: never complete
            shutil.rmtree(final)
        os.makedirs(partial)
    _barrier()
    ok, error = True, None
    files: dict[str, dict] = {}
    try:
        backbone = trainer.backbone
        if backbone.kind == "deepspeed":
            backbone.engine.save_checkpoint(root, tag=tag + PARTIAL, save_latest=False)
        blob = backbone_state(backbone)                # collective under ZeRO
        if rank == 0:
            files[BACKBONE_FILE] = atomic_save(blob, os.path.join(partial, BACKBONE_FILE))
            # plain fp32 weights for export and evaluation tools (engine/export.py reads `backbone.pt`)
            files[EXPORT_FILE] = atomic_save(blob["weights"], os.path.join(partial, EXPORT_FILE))
            ema = trainer.inputs.state_dict() if getattr(trainer, "inputs", None) is not None else {}
            if ema:
                files[EMA_FILE] = atomic_save(ema, os.path.join(partial, EMA_FILE))
        del blob
        _fault("after_backbone", rank, step)
        if state.head_world != world:
            raise CheckpointError("checkpoints need the head group to span every rank (head_world "
                                  f"{state.head_world} != world {world})")
        head_entry = save_head_shard(trainer.head, os.path.join(partial, head_file(state.head_rank)))
        _fault("after_head", rank, step)
        train_state = {"format": FORMAT_VERSION, "rank": rank, "world_size": world, "step": step,
                       "rng": rng_state(), "data_position": list(trainer.data_position),
                       "nonfinite": dict(trainer.nonfinite)}
        files[train_file(rank)] = atomic_save(train_state, os.path.join(partial, train_file(rank)))
        for name in os.listdir(partial):               # DeepSpeed's files too
            path = os.path.join(partial, name)
            if os.path.isfile(path) and not name.endswith(".tmp"):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    except Exception as err:  # noqa: BLE001 - every rank must learn that one failed
        ok, error = False, f"rank {rank}: {type(err).__name__}: {err}"
    if not _all_ok(ok, state.device):
        raise CheckpointError(f"saving {final} failed on some rank" + (f" ({error})" if error else ""))
    everything = _all_gather_objects({"files": files, "head": head_entry, "head_rank": state.head_rank,
                                      "data_position": list(trainer.data_position)})
    _fault("before_manifest", rank, step)
    if rank == 0:
        all_files: dict[str, dict] = {}
        heads: dict[int, dict] = {}
        for item in everything:
            all_files.update(item["files"])
            if item["head"] is not None:
                heads[item["head_rank"]] = item["head"]
        for name in sorted(os.listdir(partial)):       # DeepSpeed's files: size only
            path = os.path.join(partial, name)
            if os.path.isfile(path) and name not in all_files and not name.endswith(".tmp"):
                all_files[name] = {"size": os.path.getsize(path)}
        head_files = [heads[r] for r in sorted(heads)]
        for entry in head_files:
            all_files[entry["file"]] = {"size": entry["size"], "crc32": entry["crc32"]}
        manifest = build_manifest(trainer, step, tag, head_files, all_files,
                                  [item["data_position"] for item in everything], reason)
        atomic_write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        fsync_dir(partial)
        _fault("before_rename", rank, step)
        os.replace(partial, final)
        fsync_dir(root)
        _fault("before_latest", rank, step)
        atomic_write_text(os.path.join(root, LATEST), tag)
        prune_checkpoints(root, trainer.cfg.checkpoint.keep_last, keep=best_tag(root, trainer), current=tag)
        print(f"checkpoint {final} ({reason}, step {step}) written in {time.perf_counter() - t0:.1f} s", flush=True)
    _barrier()
    return final


def build_manifest(trainer, step, tag, head_files, files, data_positions, reason) -> dict:
    cfg, state, head = trainer.cfg, trainer.state, trainer.head
    hook = getattr(trainer, "eval_hook", None)
    return {
        "format": FORMAT_VERSION, "tag": tag, "step": step, "reason": reason,
        "epoch": data_positions[0][0] if data_positions else 0,
        "steps_per_epoch": trainer.steps_per_epoch,
        "num_classes": int(trainer.num_classes), "embedding_size": int(cfg.model.embedding_size),
        "backbone": cfg.model.backbone, "head": head_meta(head)["type"],
        "engine": trainer.backbone.kind, "precision": cfg.precision,
        "world_size": state.world_size, "head_world_size": state.head_world, "data_world_size": state.data_world,
        "class_ranges": [[e["class_start"], e["class_count"]] for e in head_files if "class_start" in e],
        "head_files": head_files,
        "data_positions": data_positions,
        "lr": float(trainer.schedule(max(0, step - 1))) if step else float(trainer.schedule(0)),
        "schedule": {"type": cfg.schedule.type, "total_steps": trainer.total_steps},
        "loss_scale": float(trainer.backbone.loss_scale()),
        "nonfinite": dict(trainer.nonfinite),
        "eval": hook.state_dict() if hook is not None else None,
        "eval_was_best": bool(getattr(hook, "last_was_best", False)) if hook is not None else False,
        "config": cfg.to_dict(), "code": code_version(), "time": time.time(),
        "files": files,
    }


def best_tag(root: str, trainer) -> str | None:
    """The checkpoint saved when evaluation last reported a new best (kept by retention)."""
    best = None
    hook = getattr(trainer, "eval_hook", None)
    if hook is None or hook.best_step is None:
        return None
    for tag in checkpoint_tags(root):
        if int(TAG_PATTERN.match(tag).group(1)) == hook.best_step:
            best = tag
    return best


def prune_checkpoints(root: str, keep_last: int, *, keep: str | None = None, current: str | None = None) -> list[str]:
    """Removes complete checkpoints beyond the newest `keep_last` (never `keep`, `current` or the one
    `latest` names). keep_last <= 0 keeps everything. Returns the removed tags."""
    if keep_last <= 0:
        return []
    tags = checkpoint_tags(root)
    protected = {keep, current, read_latest(root)}
    removed = []
    for tag in tags[:-keep_last]:
        if tag in protected:
            continue
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        removed.append(tag)
    if removed:
        fsync_dir(root)
    return removed


# ---------------------------------------------------------------------------------------------- loading

def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def resolve(path: str) -> str:
    """A checkpoint directory from `path`: a tag directory, or a checkpoint root (follows `latest`)."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    if os.path.isdir(path):
        tag = read_latest(path)
        if tag is not None:
            target = os.path.join(path, tag)
            if not os.path.exists(os.path.join(target, MANIFEST)):
                raise CheckpointError(f"{os.path.join(path, LATEST)} names {tag!r} but {target} has no {MANIFEST}")
            return target
        names = os.listdir(path)
        if path.endswith(PARTIAL) or os.path.basename(path).startswith("step_") or BACKBONE_FILE in names \
                or any(n.startswith("head-rank") for n in names):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST}; the save was interrupted)")
        raise CheckpointError(f"{path}: no checkpoint here (neither {MANIFEST} nor a {LATEST} file)")
    raise CheckpointError(f"{path}: no such checkpoint")


def read_manifest(directory: str, *, verify: bool = True) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: str, manifest: dict, names=None) -> None:
    """Every listed file exists with its size (and CRC-32 where recorded)."""
    for name, info in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing checkpoint file (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != info["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {info['size']} (truncated or replaced)")
        if "crc32" in info and _crc32(path) != info["crc32"]:
            raise CheckpointError(f"{path}: CRC-32 mismatch (corrupt file)")


def check_compatible(manifest: dict, trainer, directory: str) -> None:
    cfg = trainer.cfg
    want = {"num_classes": int(trainer.num_classes), "embedding_size": int(cfg.model.embedding_size),
            "backbone": cfg.model.backbone, "head": head_meta(trainer.head)["type"]}
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CheckpointError(f"{os.path.join(directory, MANIFEST)}: {key} is {manifest.get(key)!r}, this run has "
                                  f"{value!r} (a checkpoint of another model)")


def load_checkpoint(trainer, path: str) -> int:
    """Every rank calls this after building the trainer. Restores backbone, head, momentum encoder, RNG,
    data position and counters; returns the step to continue from."""
    state = trainer.state
    directory = resolve(path)
    manifest = read_manifest(directory, verify=False)
    check_compatible(manifest, trainer, directory)
    own = {BACKBONE_FILE, EMA_FILE, train_file(state.rank)} | {e["file"] for e in manifest["head_files"]}
    if BACKBONE_FILE not in manifest["files"]:
        raise CheckpointError(f"{directory}: the manifest lists no {BACKBONE_FILE}")
    verify_files(directory, manifest, names=own)
    backbone_path = os.path.join(directory, BACKBONE_FILE)
    load_backbone_state(trainer.backbone, safe_load(backbone_path), backbone_path)
    if os.path.exists(os.path.join(directory, EMA_FILE)) and getattr(trainer, "inputs", None) is not None:
        trainer.inputs.load_state_dict(safe_load(os.path.join(directory, EMA_FILE)))
    load_head_shards(trainer.head, directory, manifest["head_files"], state.head_rank, state.head_world,
                     int(manifest["head_world_size"]))
    same_world = int(manifest["world_size"]) == state.world_size and not manifest.get("resharded_from")
    positions = manifest["data_positions"]
    if same_world:
        blob = safe_load(os.path.join(directory, train_file(state.rank)))
        set_rng_state(blob["rng"])
        trainer.data_position = tuple(int(v) for v in blob["data_position"])
        trainer.nonfinite = dict(blob.get("nonfinite", trainer.nonfinite))
    else:
        # the data streams are per rank: another world size continues the same epoch at the same
        # per-rank batch count, on its own streams
        trainer.data_position = tuple(int(v) for v in positions[0])
        trainer.nonfinite = dict(manifest.get("nonfinite") or trainer.nonfinite)
    hook = getattr(trainer, "eval_hook", None)
    if hook is not None and manifest.get("eval"):
        hook.load_state_dict(manifest["eval"])
    _barrier()
    if state.is_main:
        print(f"resumed from {directory} at step {manifest['step']} (saved on {manifest['world_size']} rank(s), "
              f"now {state.world_size}; data position epoch {trainer.data_position[0]}, "
              f"batch {trainer.data_position[1]})", flush=True)
    return int(manifest["step"])


def resume_path(cfg_resume: str, checkpoint_dir: str) -> str | None:
    """`checkpoint.resume`: a path, or "auto": the newest complete checkpoint in `checkpoint_dir` (the
    one `latest` names, or a newer complete one when a kill came between its rename and `latest`),
    or None to start fresh."""
    if cfg_resume != "auto":
        return cfg_resume or None
    root = os.path.abspath(checkpoint_dir)
    tags = checkpoint_tags(root)
    latest = read_latest(root)
    if tags and _tag_step(tags[-1]) > _tag_step(latest):
        return os.path.join(root, tags[-1])
    if latest is not None:
        return root
    return None


# ---------------------------------------------------------------------------------------------- offline tools

def _head_meta_from_file(directory: str, entry: dict) -> dict:
    blob = safe_load(os.path.join(directory, entry["file"]), mmap=True)
    return {k: blob[k] for k in ("type", "num_classes", "embedding_size")}


def reshard_checkpoint(src: str, dst: str, world_size: int) -> dict:
    """Writes a copy of checkpoint `src` whose head files are split for `world_size` ranks (class-range
    heads: re-sliced by class id; keyed heads: kept, the head re-deals them at load). Backbone and
    momentum-encoder files are copied; per-rank RNG files and DeepSpeed's world-size-bound files are
    not (a resumed run at `world_size` starts its ranks' streams afresh). Returns the new manifest."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    src = resolve(src)
    manifest = read_manifest(src)
    files = manifest["head_files"]
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"{dst}: exists and is not empty")
    os.makedirs(dst, exist_ok=True)
    out_files: dict[str, dict] = {}
    for name in (BACKBONE_FILE, EXPORT_FILE, EMA_FILE):
        if name in manifest["files"]:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name + ".tmp"))
            with open(os.path.join(dst, name + ".tmp"), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(dst, name + ".tmp"), os.path.join(dst, name))
            out_files[name] = dict(manifest["files"][name])
    if files[0]["layout"] == "class_range":
        meta = _head_meta_from_file(src, files[0])
        head_files = []
        for r, part in enumerate(reslice_head_files(src, files, world_size)):
            info = atomic_save({"format": FORMAT_VERSION, **meta, **part}, os.path.join(dst, head_file(r)))
            head_files.append({"file": head_file(r), "layout": "class_range", "class_start": part["class_start"],
                               "class_count": part["class_count"], **info})
        head_world = world_size
    else:
        head_files = [dict(e) for e in files]
        for e in head_files:
            shutil.copyfile(os.path.join(src, e["file"]), os.path.join(dst, e["file"]))
        head_world = int(manifest["head_world_size"])
    for e in head_files:
        out_files[e["file"]] = {"size": e["size"], "crc32": e["crc32"]}
    new = dict(manifest)
    positions = manifest.get("data_positions") or [[0, 0]]
    new.update(world_size=world_size, head_world_size=head_world, data_world_size=world_size,
               head_files=head_files, files=out_files, resharded_from=manifest.get("world_size"),
               class_ranges=[[e["class_start"], e["class_count"]] for e in head_files if "class_start" in e],
               data_positions=[positions[0]] * world_size)
    atomic_write_text(os.path.join(dst, MANIFEST), json.dumps(new, indent=1))
    return new


def merge_head(src: str, output: str) -> dict:
    """Writes the whole head of checkpoint `src` as one file (weights_only-loadable): per-class tensors
    over all classes, or a keyed head's merged tables. Returns the file's manifest entry."""
    src = resolve(src)
    manifest = read_manifest(src)
    files = manifest["head_files"]
    meta = _head_meta_from_file(src, files[0])
    blob = {"format": FORMAT_VERSION, **meta, **merge_head_files(src, files)}
    return atomic_save(blob, output)


# ---------------------------------------------------------------------------------------------- benchmark

def bench_head_reshard(directory: str, num_classes: int, dim: int, world: int, new_world: int,
                       dtype: torch.dtype = torch.float32) -> dict:
    """Times writing a class-range head (rows + momentum) as `world` files, verifying their CRC-32, and
    re-slicing it for `new_world` ranks (what each rank reads at load time). Returns one JSON-able dict."""
    os.makedirs(directory, exist_ok=True)
    entries, save_s = [], 0.0
    for r in range(world):
        shard = ClassShard(num_classes, world, r)
        g = torch.Generator().manual_seed(r)
        per_class = {"weight": torch.randn(shard.count, dim, generator=g).to(dtype),
                     "momentum": torch.randn(shard.count, dim, generator=g).to(dtype)}
        blob = {"format": FORMAT_VERSION, "type": "full", "num_classes": num_classes, "embedding_size": dim,
                "layout": "class_range", "class_start": shard.start, "class_count": shard.count,
                "per_class": per_class, "local": {}}
        t = time.perf_counter()
        info = atomic_save(blob, os.path.join(directory, head_file(r)))      # write, fsync, rename, CRC-32
        save_s += time.perf_counter() - t
        entries.append({"file": head_file(r), "layout": "class_range", "class_start": shard.start,
                        "class_count": shard.count, **info})
        del blob, per_class
    t1 = time.perf_counter()
    verify_files(directory, {"files": {e["file"]: e for e in entries}})
    t2 = time.perf_counter()
    for r in range(new_world):
        shard = ClassShard(num_classes, new_world, r)
        gather_class_range(entries, directory, shard.start, shard.count)
    t3 = time.perf_counter()
    total = sum(e["size"] for e in entries)
    for e in entries:
        os.remove(os.path.join(directory, e["file"]))
    mb = total / 2 ** 20
    return {"num_classes": num_classes, "dim": dim, "dtype": str(dtype).replace("torch.", ""), "world": world,
            "new_world": new_world, "head_mb": round(mb, 1),
            "save_s": round(save_s, 3), "save_mb_per_s": round(mb / save_s, 1),
            "verify_crc_s": round(t2 - t1, 3), "reslice_s": round(t3 - t2, 3),
            "reslice_mb_per_s": round(mb / (t3 - t2), 1)}
