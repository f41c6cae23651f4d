"""Resuming in one process (engine ddp, one rank, CPU, tiny backbone, tiny synthetic shards):

- an interrupted-and-resumed run gives bit-for-bit the losses and final weights (backbone, head rows,
  head momentum) of an uninterrupted one, resuming mid-epoch;
- a save interrupted at every stage leaves `latest` naming the previous complete checkpoint, and the
  run resumed from it still matches the uninterrupted run;
- non-finite losses are skipped and counted; N in a row halt with a checkpoint and a clear message;
- a corrupt, truncated or foreign checkpoint is an error naming the file; retention keeps the last k.
"""
import json
import os

import pytest
import torch

from engine.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    InjectedCrash,
    checkpoint_tags,
    load_checkpoint,
    read_latest,
    resolve,
    safe_load,
)
from engine.config import load_config
from engine.trainer import NonFiniteLoss, Trainer
from parallel.groups import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "tiny_synthetic.yaml")
STEPS = 6


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from engine.data import write_synthetic

    out = str(tmp_path_factory.mktemp("data"))
    write_synthetic(out, 24, images_per_identity=6, heldout_identities=0, heldout_pairs=0, seed=1,
                    shard_size=200, workers=1, progress=False)
    return out


def make_cfg(out_dir, data_dir, extra=()):
    # 144 images / 8 per step: 18 steps an epoch, so every interruption here is mid-epoch
    return load_config(RECIPE, [f"output_dir={out_dir}", f"data.shards={data_dir}", "synthetic.enabled=false",
                                f"schedule.steps={STEPS}", "schedule.warmup_steps=1", "data.batch_size=8",
                                "data.num_workers=0", "data.shuffle_buffer=50", "data.resampled=false",
                                "model.embedding_size=16", "engine=ddp", "metrics.prometheus=false",
                                "metrics.tensorboard=false", "optim.lr=0.05", "threads=1", *extra])


def train(out_dir, data_dir, max_steps=None, extra=()):
    trainer = Trainer(make_cfg(out_dir, data_dir, extra), ParallelState.single("cpu"), metrics=False)
    result = trainer.fit(max_steps=max_steps)
    return trainer, result


def weights(trainer):
    return ({k: v.clone() for k, v in trainer.backbone.module.state_dict().items()},
            trainer.head.bank.weight.clone(), trainer.head.bank.momentum.clone())


def assert_same(a, b):
    (bb_a, w_a, m_a), (bb_b, w_b, m_b) = a, b
    assert bb_a.keys() == bb_b.keys()
    for k in bb_a:
        assert torch.equal(bb_a[k], bb_b[k]), k
    assert torch.equal(w_a, w_b) and torch.equal(m_a, m_b)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    trainer, result = train(out, tiny_data, extra=["checkpoint.every_n_steps=2"])
    return {"losses": result.losses, "final": weights(trainer), "out": out}


def test_interrupted_and_resumed_run_matches_uninterrupted_bit_for_bit(tiny_data, reference, tmp_path):
    out = str(tmp_path / "run")
    first, r1 = train(out, tiny_data, max_steps=3)
    assert r1.steps == 3 and first.data_position == (0, 3)
    manifest = json.load(open(os.path.join(r1.checkpoint, MANIFEST)))
    assert manifest["step"] == 3 and manifest["data_positions"] == [[0, 3]] and manifest["epoch"] == 0
    assert manifest["class_ranges"] == [[0, 24]] and manifest["num_classes"] == 24
    del first
    second, r2 = train(out, tiny_data, extra=["checkpoint.resume=auto"])
    assert r2.steps == STEPS
    assert r1.losses + r2.losses == reference["losses"]          # exact float equality
    assert_same(weights(second), reference["final"])


def test_fast_forward_reads_but_does_not_decode_the_consumed_batches(tiny_data, reference, tmp_path):
    out = str(tmp_path / "run")
    train(out, tiny_data, max_steps=3)
    trainer = Trainer(make_cfg(out, tiny_data, ["checkpoint.resume=auto"]), ParallelState.single("cpu"),
                      metrics=False)
    stream = trainer.loader.stream
    real, decoded = stream.decoder, []

    def counting(data):
        decoded.append(len(data))
        return real(data)

    stream.decoder = counting
    result = trainer.fit()
    assert result.losses == reference["losses"][3:]
    assert len(decoded) == (STEPS - 3) * 8           # only the batches trained on were decoded
    assert stream.decoder is counting                # the real decoder is back after the epoch's skip


def test_resume_at_an_epoch_boundary_in_resampled_mode_matches_uninterrupted(tiny_data, tmp_path):
    # resampled shards, 5 steps an epoch: interrupted exactly at the end of epoch 0, resumed into epoch 1
    extra = ["data.resampled=true", "data.num_images=40", "schedule.steps=8"]
    ref_trainer, ref = train(str(tmp_path / "ref"), tiny_data, extra=extra)
    out = str(tmp_path / "run")
    first, r1 = train(out, tiny_data, max_steps=5, extra=extra)
    assert first.data_position == (1, 0)            # epoch 0 consumed: nothing of it is read again
    second, r2 = train(out, tiny_data, extra=[*extra, "checkpoint.resume=auto"])
    assert r1.losses + r2.losses == ref.losses and len(ref.losses) == 8
    assert second.data_position == (1, 3)
    assert_same(weights(second), weights(ref_trainer))


@pytest.mark.parametrize("stage", ["after_backbone", "after_head", "before_manifest", "before_rename",
                                   "before_latest"])
def test_save_interrupted_at_any_stage_leaves_previous_checkpoint_loadable(tiny_data, reference, tmp_path,
                                                                           monkeypatch, stage):
    out = str(tmp_path / "run")
    monkeypatch.setenv("SHARDFACE_CHECKPOINT_FAULT", f"stage={stage},action=raise,step=4")
    with pytest.raises(InjectedCrash):
        train(out, tiny_data, extra=["checkpoint.every_n_steps=2"])
    monkeypatch.delenv("SHARDFACE_CHECKPOINT_FAULT")
    root = os.path.join(out, "checkpoint")
    # the newest complete checkpoint is step 2, or step 4 if the crash came after its rename
    expected = "step_00000004" if stage == "before_latest" else "step_00000002"
    assert read_latest(root) == "step_00000002"
    assert checkpoint_tags(root)[-1] == expected
    # resume=auto takes the newest complete checkpoint, even one `latest` did not reach yet
    trainer, result = train(out, tiny_data, extra=["checkpoint.resume=auto", "checkpoint.every_n_steps=2"])
    assert result.losses == reference["losses"][int(expected[-2:]):]
    assert_same(weights(trainer), reference["final"])
    assert not [d for d in os.listdir(root) if d.endswith(".partial")]
    assert read_latest(root) == "step_00000006"


def test_nonfinite_losses_are_skipped_then_halt_with_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    trainer = Trainer(make_cfg(out, tiny_data, ["checkpoint.max_nonfinite_steps=3"]), ParallelState.single("cpu"),
                      metrics=False)
    real_forward = trainer.head.forward
    calls = {"n": 0}

    def flaky(x, labels, batch=None):
        calls["n"] += 1
        out = real_forward(x, labels, batch)
        if calls["n"] == 2 or calls["n"] >= 4:          # one isolated bad step, then a run of them
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.head, "forward", flaky)
    before = trainer.head.bank.weight.clone()
    with pytest.raises(NonFiniteLoss, match=r"3 non-finite losses in a row \(4 in all\); halted, checkpoint .*step_00000006"):
        trainer.fit()
    manifest = json.load(open(os.path.join(out, "checkpoint", "step_00000006", MANIFEST)))
    assert manifest["nonfinite"] == {"total": 4, "in_a_row": 3} and manifest["reason"] == "halted"
    assert trainer.step == 6 and not torch.equal(before, trainer.head.bank.weight)


def test_corrupt_truncated_or_foreign_checkpoint_is_an_error_naming_the_file(tiny_data, reference, tmp_path):
    import shutil

    src = resolve(os.path.join(reference["out"], "checkpoint"))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    trainer = Trainer(make_cfg(str(tmp_path / "x"), tiny_data), ParallelState.single("cpu"), metrics=False)
    head_path = bad / "head-rank00000.pt"
    data = bytearray(head_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="head-rank00000.pt: CRC-32 mismatch"):
        load_checkpoint(trainer, str(bad))
    head_path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="head-rank00000.pt: .* bytes, the manifest says"):
        load_checkpoint(trainer, str(bad))
    os.remove(head_path)
    with pytest.raises(CheckpointError, match="head-rank00000.pt: missing"):
        load_checkpoint(trainer, str(bad))
    os.remove(bad / MANIFEST)
    with pytest.raises(CheckpointError, match="no manifest.json|not a complete checkpoint"):
        load_checkpoint(trainer, str(bad))
    other = Trainer(make_cfg(str(tmp_path / "y"), tiny_data, ["data.num_classes=30"]), ParallelState.single("cpu"),
                    metrics=False)
    with pytest.raises(CheckpointError, match="manifest.json: num_classes is 24, this run has 30"):
        load_checkpoint(other, src)
    # every file the loader reads is weights-only; a pickled object is refused
    evil = tmp_path / "evil.pt"
    torch.save({"x": PickledObject()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read"):
        safe_load(str(evil))


class PickledObject:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_retention_keeps_the_last_k_and_latest(reference):
    root = os.path.join(reference["out"], "checkpoint")
    assert checkpoint_tags(root) == ["step_00000002", "step_00000004", "step_00000006"]
    with open(os.path.join(root, LATEST)) as f:
        assert f.read() == "step_00000006"


def test_retention_prunes_old_checkpoints_but_keeps_best(tmp_path):
    from engine.checkpoint import prune_checkpoints

    root = tmp_path / "ck"
    for step in (1, 2, 3, 4, 5):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / MANIFEST).write_text("{}")
    (root / LATEST).write_text("step_00000005")
    removed = prune_checkpoints(str(root), 2, keep="step_00000002")
    assert removed == ["step_00000001", "step_00000003"]
    assert checkpoint_tags(str(root)) == ["step_00000002", "step_00000004", "step_00000005"]
