"""Head checkpoints re-sliced to another world size (W -> W'), checked entry by entry against what was
saved: parametric rows, momentum (bfloat16 rows + int8 momentum with scales), MutualFace hard queues
and scores by class id; DCQ queue entries by FIFO position; F2C pool slots by identity. Also the
offline tools (tools/reshard.py, tools/merge_head.py) and the clear errors on a missing or foreign
head file. Heads run on gloo ranks without a backbone."""
import importlib.util
import math
import os
from dataclasses import dataclass

import pytest
import torch
from multirank import run_ranks

from engine.checkpoint import (
    CheckpointError,
    head_file,
    load_head_shards,
    merge_head_files,
    reshard_checkpoint,
    safe_load,
    save_head_shard,
)
from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, OptimizerConfig
from parallel.sharding import ClassShard, class_owner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, D, B, STEPS = 23, 6, 4, 3
MARGIN = MarginConfig(m1=1.0, m2=0.3, m3=0.0, scale=8.0)


def case_configs():
    return {
        "partial_bf16_int8": HeadConfig(type="partial", sample_rate=0.6, storage_dtype="bfloat16", seed=3,
                                        margin=MARGIN, optimizer=OptimizerConfig(momentum_dtype="int8")),
        "mutual_score": HeadConfig(type="mutual", sample_rate=0.7, seed=4, margin=MARGIN,
                                   extra=dict(queue_size=3, top_h=2, hard_share=0.5, update="score", decay=0.8)),
        "dcq": HeadConfig(type="dcq", extra=dict(queue_size=48, layout="sharded",
                                                 margin=dict(m1=1.0, m2=0.0, m3=0.3, scale=8.0))),
        "f2c": HeadConfig(type="f2c", extra=dict(pool_size=24, margin=dict(m1=1.0, m2=0.5, m3=0.0, scale=8.0))),
    }


def step_inputs(name, world, rank, step):
    """This rank's slice of a global step, the same whatever the world size that runs it."""
    g = torch.Generator().manual_seed(1000 * step + 7)
    rows = 2 * B if name == "f2c" else B
    x = torch.randn(world * rows, D, generator=g)[rank * rows:(rank + 1) * rows]
    y = torch.randint(0, C, (world * rows,), generator=g)[rank * rows:(rank + 1) * rows]
    if name == "f2c":
        y[B:] = y[:B]                       # the two sides of identity pairs
    extra = torch.randn(world * rows, D, generator=g)[rank * rows:(rank + 1) * rows]
    batch = {"keys": extra} if name == "dcq" else {"gallery": extra} if name == "f2c" else None
    return x, y, batch


def train_and_save(state, root):
    out = {}
    for name, cfg in case_configs().items():
        head = build_head(cfg, state, C, D)
        for step in range(STEPS):
            x, y, batch = step_inputs(name, state.world_size, state.rank, step)
            head(x.requires_grad_(True), y, batch).loss.backward()
            head.step(0.5)
        directory = os.path.join(root, name)
        os.makedirs(directory, exist_ok=True)
        entry = save_head_shard(head, os.path.join(directory, head_file(state.rank)))
        out[name] = {"entry": entry, "state": {k: (v.clone() if torch.is_tensor(v) else v)
                                               for k, v in head.sharded_state().items()}}
    return out


def load_and_step(state, root, files, saved_world):
    out = {}
    for name, cfg in case_configs().items():
        head = build_head(cfg, state, C, D)
        load_head_shards(head, os.path.join(root, name), files[name], state.rank, state.world_size, saved_world)
        loaded = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in head.sharded_state().items()}
        x, y, batch = step_inputs(name, state.world_size, state.rank, STEPS)
        res = head(x.requires_grad_(True), y, batch)            # the re-sliced head keeps training
        res.loss.backward()
        head.step(0.5)
        out[name] = {"state": loaded, "loss": float(res.loss)}
    return out


@dataclass
class RankView(ParallelState):
    """Rank `view_rank` of `view_world` as the head sees it, in this process (loading needs no
    collectives, so every rank of another world size can be checked here)."""

    view_rank: int = 0
    view_world: int = 1

    @property
    def head_rank(self) -> int:
        return self.view_rank

    @property
    def head_world(self) -> int:
        return self.view_world


def load_here(root, files, saved_worlds, new_world):
    out = []
    for r in range(new_world):
        state = RankView(rank=r, world_size=new_world, local_rank=r, device=torch.device("cpu"),
                         view_rank=r, view_world=new_world)
        res = {}
        for name, cfg in case_configs().items():
            head = build_head(cfg, state, C, D)
            load_head_shards(head, os.path.join(root, name), files[name], r, new_world, saved_worlds[name])
            res[name] = {"state": head.sharded_state(), "loss": 0.0}
        out.append(res)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Heads trained on 2 gloo ranks and saved; the same files re-sliced offline for 4 and 3 ranks."""
    root = str(tmp_path_factory.mktemp("w2"))
    results = run_ranks(train_and_save, 2, args=(root,))
    files = {name: [r[name]["entry"] for r in results] for name in case_configs()}
    out = {2: {"root": root, "results": results, "files": files, "worlds": dict.fromkeys(files, 2)}}
    for world in (3, 4):
        other = str(tmp_path_factory.mktemp(f"w{world}"))
        out[world] = {"root": other, "results": results, "files": {}, "worlds": {}}
        for name in case_configs():
            _write_manifest(os.path.join(root, name), files[name], 2)
            manifest = reshard_checkpoint(os.path.join(root, name), os.path.join(other, name), world)
            out[world]["files"][name] = manifest["head_files"]
            out[world]["worlds"][name] = manifest["head_world_size"]     # keyed heads keep their files
    return out


PER_CLASS = {"partial_bf16_int8": ("weight", "momentum", "momentum_scale"),
             "mutual_score": ("weight", "momentum", "hard_queue", "hard_score")}


def check_against_original(original, loaded, new):
    """`original`: per-rank states as trained at W = 2; `loaded`: per-rank states at W' = new."""
    for name, keys in PER_CLASS.items():
        for r in range(new):
            st = loaded[r][name]["state"]
            assert (st["class_start"], st["class_count"]) == ClassShard(C, new, r).span
        for key in keys:
            before = torch.cat([res[name]["state"][key] for res in original])     # by class id
            after = torch.cat([res[name]["state"][key] for res in loaded])       # by class id, W' ranks
            assert before.shape[0] == C and before.dtype == after.dtype
            assert torch.equal(before, after), (name, key)
    first = original[0]["partial_bf16_int8"]["state"]
    assert first["weight"].dtype == torch.bfloat16 and first["momentum"].dtype == torch.int8
    # DCQ: each queued key keeps its FIFO position, key and label; the newest ones are kept
    entries = {}
    for res in original:
        st = res["dcq"]["state"]
        for p, k, y in zip(st["positions"].tolist(), st["keys"], st["labels"].tolist()):
            entries[p] = (k, y)
    got = {}
    for res in loaded:
        st = res["dcq"]["state"]
        assert st["positions"].numel() <= 48 // new
        for p, k, y in zip(st["positions"].tolist(), st["keys"], st["labels"].tolist()):
            assert p not in got
            got[p] = (k, y)
    kept = min(len(entries), 48)
    kept -= kept % new
    assert len(entries) == 2 * B * STEPS and sorted(got) == sorted(entries)[len(entries) - kept:]
    for p, (k, y) in got.items():
        assert torch.equal(k, entries[p][0]) and y == entries[p][1]
    # F2C: every identity lands on its owner with its features, toggle and recency
    pool = {}
    for res in original:
        st = res["f2c"]["state"]
        for i, ident in enumerate(st["identities"].tolist()):
            pool[ident] = (st["features"][i], int(st["toggle"][i]), int(st["last_used"][i]))
    assert len(pool) > 4
    for r, res in enumerate(loaded):
        st = res["f2c"]["state"]
        slots = ClassShard(24, new, r).count
        owned = sorted((v[2], i) for i, v in pool.items() if int(class_owner(torch.tensor(i), C, new)) == r)
        assert st["identities"].tolist() == [i for _, i in owned[-slots:]]
        for i, ident in enumerate(st["identities"].tolist()):
            assert torch.equal(st["features"][i], pool[ident][0])
            assert (int(st["toggle"][i]), int(st["last_used"][i])) == pool[ident][1:]


def test_head_state_reslices_2_to_3_ranks_and_keeps_training(saved):
    src = saved[2]
    loaded = run_ranks(load_and_step, 3, args=(src["root"], src["files"], 2))
    check_against_original(src["results"], loaded, 3)
    for res in loaded:
        assert all(math.isfinite(v["loss"]) for v in res.values())


@pytest.mark.parametrize("old,new", [(2, 1), (4, 2), (3, 2), (4, 3)])
def test_head_state_reslices_to_another_world_size_entry_by_entry(saved, old, new):
    src = saved[old]
    check_against_original(saved[2]["results"], load_here(src["root"], src["files"], src["worlds"], new), new)


def test_same_world_size_loads_each_rank_own_file_unchanged(saved):
    src = saved[2]
    loaded = load_here(src["root"], src["files"], src["worlds"], 2)
    for r in range(2):
        for name in case_configs():
            a, b = src["results"][r][name]["state"], loaded[r][name]["state"]
            assert set(a) == set(b), name
            for key in a:
                if torch.is_tensor(a[key]):
                    assert torch.equal(a[key], b[key]), (name, key)
                else:
                    assert a[key] == b[key], (name, key)


def test_missing_or_foreign_head_file_is_an_error_naming_it(saved, tmp_path):
    src = saved[2]
    state = ParallelState.single("cpu")
    directory = os.path.join(src["root"], "partial_bf16_int8")
    files = src["files"]["partial_bf16_int8"]
    head = build_head(case_configs()["partial_bf16_int8"], state, C, D)
    broken = [dict(files[0]), dict(files[1], file="head-rank00009.pt")]
    with pytest.raises(CheckpointError, match="head-rank00009.pt: missing"):
        load_head_shards(head, directory, broken, 0, 1, 2)
    with pytest.raises(CheckpointError, match="2 head files for a head group of 3"):
        load_head_shards(head, directory, files, 0, 1, 3)
    other = build_head(case_configs()["partial_bf16_int8"], state, C + 1, D)
    with pytest.raises(CheckpointError, match="num_classes is 23, this run has 24"):
        load_head_shards(other, directory, files, 0, 1, 2)
    truncated = tmp_path / "t"
    truncated.mkdir()
    for e in files:
        data = open(os.path.join(directory, e["file"]), "rb").read()
        (truncated / e["file"]).write_bytes(data[: len(data) // 2] if e is files[1] else data)
    with pytest.raises(CheckpointError, match=f"{files[1]['file']}: cannot be read"):
        load_head_shards(head, str(truncated), files, 0, 1, 2)
    fp32 = build_head(HeadConfig(type="partial", sample_rate=0.6, seed=3, margin=MARGIN), state, C, D)
    with pytest.raises(CheckpointError, match="another head configuration|is torch.bfloat16"):
        load_head_shards(fp32, directory, files, 0, 1, 2)


def test_merge_head_gives_every_class_once(saved):
    src = saved[3]
    directory = os.path.join(src["root"], "mutual_score")
    merged = merge_head_files(directory, src["files"]["mutual_score"])
    assert len(src["files"]["mutual_score"]) == 3
    assert merged["class_count"] == C
    ref = torch.cat([r["mutual_score"]["state"]["weight"] for r in src["results"]])
    assert torch.equal(merged["per_class"]["weight"], ref)


def _write_manifest(directory, files, world):
    import json

    from engine.checkpoint import FORMAT_VERSION, MANIFEST

    manifest = {"format": FORMAT_VERSION, "world_size": world, "head_world_size": world, "num_classes": C,
                "embedding_size": D, "head": files[0].get("head", "mutual"), "head_files": files,
                "class_ranges": [[e["class_start"], e["class_count"]] for e in files if "class_start" in e],
                "files": {e["file"]: {"size": e["size"], "crc32": e["crc32"]} for e in files}}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_reshard_and_merge_tools_offline(saved, tmp_path):
    src = saved[2]
    directory = os.path.join(src["root"], "mutual_score")
    out = tmp_path / "resharded"
    assert _tool("reshard")([directory, str(out), "--world-size", "3"]) == 0
    ref = torch.cat([r["mutual_score"]["state"]["hard_queue"] for r in src["results"]])
    got = [safe_load(str(out / head_file(r))) for r in range(3)]
    assert [(g["class_start"], g["class_count"]) for g in got] == [ClassShard(C, 3, r).span for r in range(3)]
    assert torch.equal(torch.cat([g["per_class"]["hard_queue"] for g in got]), ref)
    merged = tmp_path / "head.pt"
    assert _tool("merge_head")([str(out), str(merged)]) == 0
    blob = safe_load(str(merged))
    ref_w = torch.cat([r["mutual_score"]["state"]["weight"] for r in src["results"]])
    assert torch.equal(blob["per_class"]["weight"], ref_w) and blob["num_classes"] == C
    assert _tool("reshard")([directory, str(out), "--world-size", "2"]) == 2      # refuses a non-empty output


@pytest.mark.parametrize("name,cfg", [
    ("dcq", HeadConfig(type="dcq", extra=dict(queue_size=8, layout="sharded",
                                              margin=dict(m1=1.0, m2=0.0, m3=0.3, scale=8.0)))),
    ("dcq", HeadConfig(type="dcq", extra=dict(queue_size=8, layout="replicated",
                                              margin=dict(m1=1.0, m2=0.0, m3=0.3, scale=8.0)))),
    ("f2c", HeadConfig(type="f2c", extra=dict(pool_size=6, margin=dict(m1=1.0, m2=0.5, m3=0.0, scale=8.0)))),
    ("mutual_score", case_configs()["mutual_score"]),
])
def test_memory_heads_reloaded_at_the_same_size_continue_bit_for_bit(tmp_path, name, cfg):
    """A ring that wrapped (DCQ) and a pool that evicted (F2C) reload into the same slots: the next
    steps' losses and states equal those of the head that was never saved."""
    state = ParallelState.single("cpu")
    head = build_head(cfg, state, C, D)

    def run(h, steps):
        losses = []
        for step in steps:
            x, y, batch = step_inputs(name, 1, 0, step)
            out = h(x.requires_grad_(True), y, batch)
            out.loss.backward()
            h.step(0.5)
            losses.append(float(out.loss.detach()))
        return losses

    run(head, range(5))
    entry = save_head_shard(head, str(tmp_path / head_file(0)))
    again = build_head(cfg, state, C, D)
    load_head_shards(again, str(tmp_path), [entry], 0, 1, 1)
    assert run(again, range(5, 9)) == run(head, range(5, 9))
    a, b = head.sharded_state(), again.sharded_state()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
