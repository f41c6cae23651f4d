"""Getting a backbone out of training: consolidated fp32 weights and ONNX.

- `consolidate_deepspeed_checkpoint(dir)`: the backbone's fp32 state dict from a DeepSpeed checkpoint
  (ZeRO 1-3 shards merged by `deepspeed.utils.zero_to_fp32`; stage 0 from the model states file), read
  with `torch.load(weights_only=True)` and an allowlist of the four DeepSpeed bookkeeping classes
  such files hold, so no code in the checkpoint runs. `save_backbone_state_dict` writes `backbone.pt`.
- `load_backbone_state_dict(path)`: a `backbone.pt` (weights only) or a checkpoint directory.
- `export_onnx(backbone, path)`: ONNX with a dynamic batch axis, checked against PyTorch in
  onnxruntime; a mismatch raises `OnnxParityError`.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)` by default (opset 17). On
torch 2.13 it exports every registered backbone with a dynamic batch and float32-level parity, writes
one self-contained file, prints nothing, and takes seconds (mbf: ~1.7 s against ~16-25 s). torch marks
it deprecated; the dynamo exporter (torch's default; opset 18) is the alternative, `exporter="dynamo"`,
run here with `external_data=False` (one file; every backbone is far below protobuf's 2 GB) and its
progress printing sent to stderr so that stdout stays machine-readable. setup.cfg pins torch <= 2.13.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint path that holds no backbone weights we can read; the message names the path."""


# --------------------------------------------------------------------------------------------------
# DeepSpeed checkpoints -> fp32 state dict

def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into ZeRO checkpoints (plain data holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(f, map_location=None, mmap=None, weights_only=None, **_):
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(f, map_location=map_location, mmap=mmap, weights_only=True)


class _TorchWithSafeLoad(types.ModuleType):
    """`torch` as zero_to_fp32 sees it during consolidation: everything the same except `load`,
    which is weights-only (zero_to_fp32 itself asks for weights_only=False)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    load = staticmethod(_weights_only_load)


def resolve_deepspeed_checkpoint(path: str, tag: str | None = None) -> tuple[str, str]:
    """(checkpoint_dir, tag) of a DeepSpeed checkpoint given its directory (with `latest`), a tag
    directory inside it, or a directory with one such checkpoint directly below it."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "latest")) or tag is not None:
        if tag is None:
            with open(os.path.join(path, "latest")) as f:
                tag = f.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{path}: tag {tag!r} has no directory")
        return path, tag
    if glob.glob(os.path.join(path, "*model_states.pt")):
        return os.path.dirname(path), os.path.basename(path)
    below = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isfile(os.path.join(d, "latest")))
    if len(below) == 1:
        return resolve_deepspeed_checkpoint(below[0])
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file, no *model_states.pt, "
                          f"{len(below)} checkpoint directories below it)")


def consolidate_deepspeed_checkpoint(path: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the module a DeepSpeed engine saved (here: the bare backbone)."""
    from deepspeed.utils import zero_to_fp32

    ckpt_dir, tag = resolve_deepspeed_checkpoint(path, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    if not glob.glob(os.path.join(tag_dir, "*_optim_states.pt")) and os.path.isfile(
            os.path.join(tag_dir, "mp_rank_00_model_states.pt")):
        # ZeRO stage 0: the module's state dict is stored whole (in its training precision)
        state = _weights_only_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu")
        module = state.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{tag_dir}: model states file has no 'module' state dict")
        return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in module.items()}
    real_torch = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad("torch")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            merged = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{tag_dir}: cannot consolidate ({type(exc).__name__}: {exc})") from exc
    finally:
        zero_to_fp32.torch = real_torch
    # own, contiguous storage per tensor (the merge returns views of flat partitions)
    return {k: v.detach().clone().contiguous() for k, v in merged.items()}


def save_backbone_state_dict(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Writes `backbone.pt` atomically (temp file, fsync, rename): plain tensors, loadable with
    `torch.load(path, weights_only=True)`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_backbone_weights(checkpoint: str, output: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """DeepSpeed checkpoint -> `backbone.pt`; returns the state dict written."""
    state = consolidate_deepspeed_checkpoint(checkpoint, tag)
    save_backbone_state_dict(state, output)
    return state


def load_backbone_state_dict(path: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Backbone weights from a `backbone.pt` file (weights only; a plain state dict, or one under the
    key `state_dict` beside metadata), a directory holding one, or a DeepSpeed checkpoint directory
    (consolidated on the fly)."""
    if os.path.isdir(path):
        exported = os.path.join(path, "backbone.pt")
        if tag is None and os.path.isfile(exported):
            return load_backbone_state_dict(exported)
        return consolidate_deepspeed_checkpoint(path, tag)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a weights-only state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]        # the trainer's file: {"backbone", "embedding_size", "step", "state_dict"}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_backbone(name: str, checkpoint: str, embedding_size: int = 512, **options) -> torch.nn.Module:
    """`models.build_backbone(name, ...)` with the checkpoint's weights (strict), in eval mode."""
    from models import build_backbone

    model = build_backbone(name, embedding_size=embedding_size, **options)
    state = load_backbone_state_dict(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: does not fit backbone {name!r} "
                              f"(embedding_size={embedding_size}): {exc}") from exc
    return model.eval()


# --------------------------------------------------------------------------------------------------
# ONNX

class OnnxParityError(AssertionError):
    pass


@dataclass
class OnnxExportReport:
    path: str
    max_abs_diff: float              # raw embeddings, onnxruntime vs PyTorch
    max_abs_diff_normalized: float   # unit-length embeddings
    output_scale: float              # max |embedding| of the PyTorch reference
    batch_sizes: tuple
    exporter: str

    def to_dict(self) -> dict:
        return dict(path=self.path, max_abs_diff=self.max_abs_diff,
                    max_abs_diff_normalized=self.max_abs_diff_normalized, output_scale=self.output_scale,
                    batch_sizes=list(self.batch_sizes), exporter=self.exporter)


def _export(backbone, example, path, exporter, opset):
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(backbone, (example,), path, input_names=["input"], output_names=["embedding"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False,
                              opset_version=opset)
        elif exporter == "torchscript":
            torch.onnx.export(backbone, (example,), path, input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False,
                              opset_version=min(opset, 17))   # the TorchScript exporter's newest
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")


def check_onnx_parity(backbone: torch.nn.Module, path: str, batch_sizes=(2, 3), tolerance: float = 1e-4,
                      seed: int = 0) -> tuple[float, float, float]:
    """(max abs diff, same on unit-normalized embeddings, output scale) between onnxruntime and
    PyTorch on random inputs of each batch size; raises OnnxParityError beyond `tolerance`
    (relative to the output scale when that exceeds 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    worst = worst_unit = scale = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
        with torch.no_grad():
            want = backbone(x).float().numpy()
        got = session.run(None, {input_name: x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxParityError(f"{path}: onnxruntime output {got.shape} for batch {b}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
        unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # noqa: E731
        worst_unit = max(worst_unit, float(np.abs(unit(got) - unit(want)).max()))
        scale = max(scale, float(np.abs(want).max()))
    if worst > tolerance * max(1.0, scale) or worst_unit > tolerance:
        raise OnnxParityError(
            f"{path}: onnxruntime differs from PyTorch by {worst:.3g} (output scale {scale:.3g}), "
            f"{worst_unit:.3g} on normalized embeddings; tolerance {tolerance:g}")
    return worst, worst_unit, scale


def export_onnx(backbone: torch.nn.Module, path: str, exporter: str = "torchscript", opset: int = 18,
                check_batch_sizes=(2, 3), tolerance: float = 1e-4) -> OnnxExportReport:
    """Exports `backbone` (eval mode, float32, CPU) to `path` with input `input (batch, 3, 112, 112)`
    and output `embedding (batch, D)`, then checks it in onnxruntime (raises OnnxParityError)."""
    backbone = backbone.float().cpu().eval()
    example = torch.zeros(max(check_batch_sizes), 3, 112, 112)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _export(backbone, example, path, exporter, opset)
    diff, diff_unit, scale = check_onnx_parity(backbone, path, check_batch_sizes, tolerance)
    return OnnxExportReport(path, diff, diff_unit, scale, tuple(check_batch_sizes), exporter)
