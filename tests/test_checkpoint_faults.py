"""Fault injection on a real 2-rank job (tools/train.py, DeepSpeed ZeRO-1 on CPU/gloo, tiny backbone and
shards), the ranks started as plain processes with the launcher's environment, as SLURM/torchrun do:

1. an uninterrupted reference run (12 steps, a checkpoint every 2);
2. the same run with rank 1 held in the middle of the step-4 save, then kill -9 of rank 1 and of the
   stuck rank 0: `latest` still names step 2, and the half-written step 4 never counts;
3. resumed (`checkpoint.resume=auto`), then kill -9 of rank 0 at a random moment of training;
4. resumed, then SIGTERM to rank 1 only: both ranks stop at the same step, save, and exit 0;
5. resumed to the end: the losses of every resumed segment and the final backbone and head equal the
   reference run's, bit for bit;
6. the step-4 checkpoint of the reference loaded on one rank (2 -> 1) holds every entry it saved
   (ZeRO-2 + bf16, ZeRO-3 and AdamW variants with SHARDFACE_SLOW_TESTS=1).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from multirank import free_port

from engine.checkpoint import MANIFEST, read_latest, read_manifest, resolve, safe_load
from engine.demo import rank_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
RECIPE = os.path.join(ROOT, "configs", "tiny_synthetic.yaml")
STEPS = 12


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from engine.data import write_synthetic

    out = str(tmp_path_factory.mktemp("data"))
    write_synthetic(out, 24, images_per_identity=8, heldout_identities=0, heldout_pairs=0, seed=2,
                    shard_size=64, workers=1, progress=False)
    return out


class Job:
    """W rank processes of tools/train.py; logs in <out>/rank<r>.log (appended across restarts)."""

    def __init__(self, out_dir, data_dir, world, extra=(), env=None):
        self.out_dir, self.world = out_dir, world
        os.makedirs(out_dir, exist_ok=True)
        overrides = [f"output_dir={out_dir}", f"data.shards={data_dir}", "synthetic.enabled=false",
                     f"schedule.steps={STEPS}", "schedule.warmup_steps=1", "data.batch_size=8", "data.num_workers=1",
                     "data.shuffle_buffer=40", "model.embedding_size=16", "metrics.prometheus=false",
                     "metrics.tensorboard=false", "metrics.log_every=1", "checkpoint.every_n_steps=2",
                     "checkpoint.keep_last=0", "checkpoint.grace_period_s=60", "optim.lr=0.05", *extra]
        cmd = [sys.executable, TRAIN, "--config", RECIPE]
        for item in overrides:
            cmd += ["--set", item]
        port = str(free_port())
        self.procs, self.logs, self.offsets = [], [], []
        for rank in range(world):
            e = rank_env(world)
            e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", **(env or {}))
            log_path = os.path.join(out_dir, f"rank{rank}.log")
            self.offsets.append(os.path.getsize(log_path) if os.path.exists(log_path) else 0)
            log = open(log_path, "a")
            self.logs.append(log_path)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            log.close()

    def text(self, rank=0) -> str:
        """What this job's rank wrote (the log file also holds earlier jobs of the same run)."""
        with open(self.logs[rank]) as f:
            f.seek(self.offsets[rank])
            return f.read()

    def wait_for(self, needle, rank=0, timeout=240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text(rank):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not seen in rank {rank}'s log:\n{self.text(rank)[-3000:]}")

    def kill(self, rank) -> None:
        os.killpg(self.procs[rank].pid, signal.SIGKILL)
        self.procs[rank].wait()

    def finish(self, timeout=300) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)


def result(out_dir) -> dict:
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)


def losses_by_step(res) -> dict[int, float]:
    first = res["steps"] - len(res["losses"]) + 1
    return {first + i: v for i, v in enumerate(res["losses"])}


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    job = Job(out, tiny_data, 2)
    assert job.finish() == [0, 0], job.text()[-3000:]
    return out


def test_kills_mid_save_and_mid_training_then_sigterm_lose_nothing(tiny_data, reference, tmp_path):
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoint")
    # 2. rank 1 sleeps between its head file and the manifest of step 4; kill -9 it, then the stuck rank 0
    job = Job(out, tiny_data, 2, env={"SHARDFACE_CHECKPOINT_FAULT": "stage=after_head,action=sleep,seconds=300,"
                                                                     "rank=1,step=4"})
    job.wait_for("checkpoint fault injection: rank 1 sleep at after_head (step 4)", rank=1)
    job.kill(1)
    job.kill(0)
    assert read_latest(root) == "step_00000002"
    assert os.path.isdir(os.path.join(root, "step_00000004.partial"))
    read_manifest(resolve(root))                                           # complete: every file, size, CRC

    # 3. resume, then kill -9 rank 0 at a random moment of steps 3..7
    job = Job(out, tiny_data, 2, extra=["checkpoint.resume=auto"])
    job.wait_for("resumed from")
    job.wait_for(f"step {random.Random(os.getpid()).randint(3, 5)}/{STEPS}")
    time.sleep(random.Random(os.getpid() + 1).uniform(0.0, 0.3))  # short: steps of this tiny run are fast
    job.kill(0)
    job.kill(1)
    latest = read_latest(root)
    manifest = read_manifest(os.path.join(root, latest))
    assert manifest["step"] >= 2 and not os.path.exists(os.path.join(root, latest + ".partial"))
    assert manifest["step"] < STEPS, "the run ended before the kill: nothing is left to resume"

    # 4. resume, then SIGTERM to rank 1 only: both stop at the same step, save, exit 0
    job = Job(out, tiny_data, 2, extra=["checkpoint.resume=auto"])
    job.wait_for(f"resumed from {os.path.join(root, latest)} at step {manifest['step']}")
    job.wait_for(f"step {manifest['step'] + 1}/{STEPS}")
    os.kill(job.procs[1].pid, signal.SIGTERM)
    codes = job.finish()
    assert codes == [0, 0], job.text(1)[-3000:]
    stopped = result(out)
    assert stopped["steps"] < STEPS, stopped
    assert "stopped by" in job.text(0) and "received SIGTERM" in job.text(1)
    saved = json.load(open(os.path.join(stopped["checkpoint"], MANIFEST)))
    assert saved["step"] == stopped["steps"] and saved["reason"].startswith("stopped by")
    assert read_latest(root) == os.path.basename(stopped["checkpoint"])

    # 5. resume to the end; every resumed segment matches the reference bit for bit
    job = Job(out, tiny_data, 2, extra=["checkpoint.resume=auto"])
    assert job.finish() == [0, 0], job.text()[-3000:]
    final = result(out)
    ref = losses_by_step(result(reference))
    for seg in (stopped, final):
        for step, loss in losses_by_step(seg).items():
            assert loss == ref[step], (step, loss, ref[step])
    assert final["steps"] == STEPS
    a, b = resolve(os.path.join(reference, "checkpoint")), resolve(root)
    wa, wb = safe_load(os.path.join(a, "backbone_state.pt")), safe_load(os.path.join(b, "backbone_state.pt"))
    for k in wa["weights"]:
        assert torch.equal(wa["weights"][k], wb["weights"][k]), k
    for n in wa["optimizer_state"]:
        for key in wa["optimizer_state"][n]:
            assert torch.equal(wa["optimizer_state"][n][key], wb["optimizer_state"][n][key]), (n, key)
    for r in range(2):
        ha, hb = (safe_load(os.path.join(d, f"head-rank{r:05d}.pt")) for d in (a, b))
        for key in ha["per_class"]:
            assert torch.equal(ha["per_class"][key], hb["per_class"][key]), key


SLOW = pytest.mark.skipif(not os.environ.get("SHARDFACE_SLOW_TESTS"), reason="set SHARDFACE_SLOW_TESTS=1")
VARIANTS = [pytest.param([], id="zero1-fp32-sgd"),
            pytest.param(["deepspeed.zero_stage=2", "precision=bf16"], id="zero2-bf16-sgd", marks=SLOW),
            pytest.param(["deepspeed.zero_stage=3"], id="zero3-fp32-sgd", marks=SLOW),
            pytest.param(["optim.optimizer=adamw", "optim.lr=0.001"], id="zero1-fp32-adamw", marks=SLOW)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_on_another_world_size_restores_every_entry(tiny_data, reference, tmp_path, variant):
    """A step-4 checkpoint of 2 ranks (ZeRO partitions over 2) loaded on one rank and saved again at once
    (schedule.steps=4): backbone weights, optimizer state and every head row equal the original."""
    if variant:
        reference = str(tmp_path / "reference")
        job = Job(reference, tiny_data, 2, extra=[*variant, "schedule.steps=4"])
        assert job.finish() == [0, 0], job.text()[-3000:]
    out = str(tmp_path / "w1")
    src = os.path.join(reference, "checkpoint", "step_00000004")
    job = Job(out, tiny_data, 1, extra=[*variant, f"checkpoint.resume={src}", "schedule.steps=4"])
    codes = job.finish()
    text = job.text()
    assert codes == [0], text[-3000:]
    assert "saved on 2 rank(s), now 1" in text
    again = resolve(os.path.join(out, "checkpoint"))
    a = safe_load(os.path.join(src, "backbone_state.pt"))
    b = safe_load(os.path.join(again, "backbone_state.pt"))
    assert a["weights"].keys() == b["weights"].keys() and a["optimizer_state"].keys() == b["optimizer_state"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for n, entries in a["optimizer_state"].items():
        assert entries.keys() == b["optimizer_state"][n].keys() and entries
        for key in entries:
            assert torch.equal(entries[key], b["optimizer_state"][n][key]), (n, key)
    assert a["optimizer_scalars"].keys() == b["optimizer_scalars"].keys()
    for key, value in a["optimizer_scalars"].items():
        assert torch.equal(value, b["optimizer_scalars"][key]) if torch.is_tensor(value) else value == b["optimizer_scalars"][key]
    heads = [safe_load(os.path.join(src, f"head-rank{r:05d}.pt")) for r in range(2)]
    one = safe_load(os.path.join(again, "head-rank00000.pt"))
    assert one["class_count"] == 24
    for key, value in one["per_class"].items():
        assert torch.equal(torch.cat([h["per_class"][key] for h in heads]), value), key
    manifest = json.load(open(os.path.join(again, MANIFEST)))
    assert manifest["world_size"] == 1 and manifest["class_ranges"] == [[0, 24]]
