"""Export: DeepSpeed (ZeRO-2/3) checkpoint -> fp32 backbone.pt, and ONNX parity for every family."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.export import (
    CheckpointError,
    OnnxParityError,
    check_onnx_parity,
    consolidate_deepspeed_checkpoint,
    export_onnx,
    load_backbone_state_dict,
)
from models import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- DeepSpeed checkpoints ---------------------------------------------------------------------------

def _train_and_save(state, out_dir):
    """Two SGD steps of the tiny backbone under ZeRO-2 and ZeRO-3; returns rank 0's full fp32 state."""
    import deepspeed

    torch.set_num_threads(1)
    expected = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        model = build_backbone("tiny", embedding_size=16)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        g = torch.Generator().manual_seed(100 + state.rank)
        for _ in range(2):
            loss = engine(torch.randn(2, 3, 112, 112, generator=g)).square().mean()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(os.path.join(out_dir, f"zero{stage}"), tag="step2")
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            expected[stage] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if stage == 3:
            # evaluation through the engine: ranks embed uneven slices (3 and 2 images) yet run the same
            # number of forward passes, which ZeRO-3's collective parameter gathering needs
            from engine.evaluation import embed_images

            faces = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
            expected["zero3_embeddings"] = embed_images(engine, faces, batch_size=2, group=state.data_group)
        engine.destroy()
    return expected if state.rank == 0 else None


@pytest.fixture(scope="module")
def deepspeed_checkpoints(tmp_path_factory):
    from multirank import run_ranks

    out = str(tmp_path_factory.mktemp("ds"))
    expected = run_ranks(_train_and_save, 2, args=(out,), timeout=300)[0]
    return out, expected


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_the_trained_fp32_backbone(deepspeed_checkpoints, tmp_path, stage):
    out, expected = deepspeed_checkpoints
    merged = consolidate_deepspeed_checkpoint(os.path.join(out, f"zero{stage}"))
    want = expected[stage]
    assert set(merged) == set(want) and len(want) > 50
    init = build_backbone("tiny", embedding_size=16).state_dict()
    moved = 0
    for k, v in want.items():
        assert merged[k].dtype == v.dtype and merged[k].shape == v.shape, k
        torch.testing.assert_close(merged[k], v, rtol=0, atol=0, msg=k)
        moved += int(v.is_floating_point() and not torch.equal(v, init[k]))
    assert moved > 40                            # training changed the weights we compare
    # backbone.pt: plain tensors, loads weights-only and strictly into a fresh backbone
    from engine.export import save_backbone_state_dict

    path = tmp_path / "backbone.pt"
    save_backbone_state_dict(merged, str(path))
    loaded = torch.load(path, weights_only=True)
    build_backbone("tiny", embedding_size=16).load_state_dict(loaded, strict=True)
    wrapped = tmp_path / "with_metadata.pt"
    torch.save({"backbone": "tiny", "embedding_size": 16, "step": 2, "state_dict": merged}, wrapped)
    assert all(torch.equal(load_backbone_state_dict(str(wrapped))[k], merged[k]) for k in merged)
    # the same through the directory entry points: checkpoint root, tag directory
    for where in (os.path.join(out, f"zero{stage}"), os.path.join(out, f"zero{stage}", "step2")):
        again = load_backbone_state_dict(where)
        assert all(torch.equal(again[k], merged[k]) for k in merged)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_loading_never_runs_pickled_code(deepspeed_checkpoints, tmp_path):
    import shutil

    out, _ = deepspeed_checkpoints
    evil = tmp_path / "evil"
    shutil.copytree(os.path.join(out, "zero2"), evil)
    marker = tmp_path / "pwned"
    optim = sorted((evil / "step2").glob("*optim_states.pt"))[0]
    state = torch.load(optim, weights_only=False)
    state["optimizer_state_dict"]["payload"] = _RunsCode(marker)
    torch.save(state, optim)
    with pytest.raises(pickle.UnpicklingError):
        consolidate_deepspeed_checkpoint(str(evil))
    plain = tmp_path / "backbone.pt"
    torch.save({"w": torch.ones(1), "x": _RunsCode(marker)}, plain)
    with pytest.raises(CheckpointError, match="backbone.pt: not a weights-only state dict"):
        load_backbone_state_dict(str(plain))
    assert not marker.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: not a DeepSpeed checkpoint"):
        load_backbone_state_dict(str(tmp_path / "empty"))


def test_export_command_writes_weights_and_a_checked_onnx_model(deepspeed_checkpoints, tmp_path):
    out, expected = deepspeed_checkpoints
    cmd = [sys.executable, os.path.join(ROOT, "tools", "export_onnx.py"), "--checkpoint",
           os.path.join(out, "zero3"), "--backbone", "tiny", "--embedding-size", "16",
           "--weights-out", str(tmp_path / "backbone.pt"), "--output", str(tmp_path / "tiny.onnx")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)           # stdout is the JSON report alone
    assert report["onnx"]["max_abs_diff"] <= 1e-4 * max(1.0, report["onnx"]["output_scale"])
    weights = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in expected[3].items())


def test_embeddings_through_a_zero3_engine_equal_the_exported_backbone(deepspeed_checkpoints):
    from engine.evaluation import embed_images

    out, expected = deepspeed_checkpoints
    model = build_backbone("tiny", embedding_size=16)
    model.load_state_dict(load_backbone_state_dict(os.path.join(out, "zero3")), strict=True)
    faces = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(expected["zero3_embeddings"], embed_images(model, faces, batch_size=2),
                               rtol=1e-5, atol=1e-5)


# --- ONNX -------------------------------------------------------------------------------------------

def calibrated(name, **options):
    """A backbone whose BatchNorm statistics come from data (as after training), so its embeddings
    have unit scale and an absolute tolerance means something."""
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=64, **options)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None                          # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


SLOW = pytest.mark.skipif(not os.environ.get("SHARDFACE_SLOW_TESTS"),
                          reason="full-size export; set SHARDFACE_SLOW_TESTS=1 to run")
# every registered backbone with both exporters; without SHARDFACE_SLOW_TESTS only the default exporter
# on the smallest of each family (tiny for the iresnets, mbf, vit_t at reduced depth through the
# registry's `depth` option)
QUICK = [("tiny", {}), ("mbf", {}), ("vit_t", {"depth": 2})]
FULL = [(n, {}) for n in ("r18", "r34", "r50", "r100", "r200", "mbf_large", "vit_t", "vit_s", "vit_b")]


def _case(name, options, exporter, slow):
    label = "-".join([name] + [f"{k}{v}" for k, v in options.items()] + [exporter])
    return pytest.param(name, options, exporter, marks=[SLOW] if slow else [], id=label)


ONNX_CASES = ([_case(n, o, "torchscript", False) for n, o in QUICK]
              + [_case(n, o, "torchscript", True) for n, o in FULL]
              + [_case(n, o, "dynamo", True) for n, o in QUICK + FULL])


def test_onnx_cases_cover_every_registered_backbone():
    from models import list_backbones

    for exporter in ("torchscript", "dynamo"):
        assert {c.values[0] for c in ONNX_CASES if c.values[2] == exporter} == set(list_backbones())


@pytest.mark.parametrize("name,options,exporter", ONNX_CASES)
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path, name, options, exporter):
    import onnx

    model = calibrated(name, **options)
    path = str(tmp_path / f"{name}.onnx")
    report = export_onnx(model, path, exporter=exporter, check_batch_sizes=(2, 3))
    assert report.max_abs_diff <= 1e-4 and report.max_abs_diff_normalized <= 1e-4
    assert 0.1 < report.output_scale < 100               # a meaningful absolute comparison
    assert os.listdir(tmp_path) == [f"{name}.onnx"]       # self-contained: no external data file
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param     # symbolic batch
    print(json.dumps({"backbone": name, **options, "exporter": report.exporter,
                      "max_abs_diff": report.max_abs_diff, "max_abs_diff_normalized":
                      report.max_abs_diff_normalized, "output_scale": report.output_scale}))


def test_onnx_parity_check_fails_loudly_on_a_different_model(tmp_path):
    model = calibrated("tiny")
    path = str(tmp_path / "tiny.onnx")
    export_onnx(model, path)
    other = calibrated("tiny")
    with torch.no_grad():
        other.fc.bias.add_(0.01)
    with pytest.raises(OnnxParityError, match="differs from PyTorch"):
        check_onnx_parity(other, path)
    diff, _, _ = check_onnx_parity(model, path)
    assert np.isfinite(diff) and diff <= 1e-4
