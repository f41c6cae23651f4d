"""F2C head: loss and gradients against a single-process dense float64 simulation of the sharded pool
(per-shard LRU, two versions, toggles, tentative first direction), for W = 1..4; pool re-slicing;
validation; head state independent of the number of classes (F2C and DCQ)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_dcq_softmax import WORLDS, memory_head_runs

from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head
from parallel.heads.f2c import F2cHead
from parallel.sharding import ClassShard, class_owner

SCALE, M2 = 8.0, 0.5
HALF, DIM, STEPS = 3, 5, 6            # per rank and side: 2 identity pairs + 1 instance row


def f2c_config(pool_size, chunk=2):
    return HeadConfig(type="f2c", compute_dtype="float64", storage_dtype="float64", chunk_size=chunk,
                      extra=dict(pool_size=pool_size, margin=dict(m1=1.0, m2=M2, m3=0.0, scale=SCALE)))


def sizes(world):
    num_classes = 6 * world                                # few identities: hits, duplicates, evictions
    return num_classes, math.ceil(1.5 * HALF * world)      # pool at its minimum


def step_data(world, step, seed):
    """Global probe embeddings X, gallery embeddings G, labels Y; rank r's rows are
    [x side (HALF), y side (HALF)]; positions 0, 1 of both sides are identity pairs."""
    num_classes, _ = sizes(world)
    g = torch.Generator().manual_seed(seed * 1000 + step)
    n = 2 * HALF
    X = torch.randn(world * n, DIM, generator=g, dtype=torch.float64)
    G = torch.randn(world * n, DIM, generator=g, dtype=torch.float64)
    Y = torch.randint(0, num_classes, (world * n,), generator=g)
    for r in range(world):
        Y[r * n + HALF:r * n + HALF + 2] = Y[r * n:r * n + 2]
    return X, G, Y


def f2c_rank(state, world, seed):
    num_classes, pool_size = sizes(world)
    head = build_head(f2c_config(pool_size), state, num_classes, DIM)
    n, r = 2 * HALF, state.head_rank
    out = []
    for t in range(STEPS):
        X, G, Y = step_data(world, t, seed)
        x = X[r * n:(r + 1) * n].clone().requires_grad_(True)
        res = head(x, Y[r * n:(r + 1) * n], {"gallery": G[r * n:(r + 1) * n]})
        res.loss.backward()
        head.step(0.1)
        out.append(dict(loss=res.loss.detach(), grad_x=x.grad / state.data_world, state=head.sharded_state()))
    # re-slice the pool saved at this world size onto one rank's view of it (each rank loads the union)
    return out


class Shard:
    """One rank's pool as plain Python: an LRU list (least recent first), two versions per slot, and
    the batch rules of parallel/heads/f2c.py written out one identity at a time."""

    def __init__(self, slots):
        self.order, self.slot_of = [], {}
        self.identity = [None] * slots
        self.versions = [[None, None] for _ in range(slots)]
        self.toggle = [0] * slots
        self.refreshed = set()
        self.repeated = self.dropped = 0     # identities written twice in a batch; left out for want of slots

    def write_batch(self, rows):
        """rows: [(identity, feature)] of this shard, in global batch order."""
        features, first, last = {}, {}, {}
        for i, (ident, feature) in enumerate(rows):
            features.setdefault(ident, []).append(feature)
            first.setdefault(ident, i)
            last[ident] = i
        slots = len(self.identity)
        kept = sorted(features, key=lambda u: last[u])[-slots:]           # the identities written last
        self.dropped += len(features) - len(kept)
        self.repeated += sum(len(f) >= 2 for f in features.values())
        hits = {u for u in kept if u in self.slot_of}
        misses = sorted((u for u in kept if u not in hits), key=lambda u: first[u])
        taken = {self.slot_of[u] for u in hits}
        free = [s for s in range(slots) if self.identity[s] is None]
        evictable = [self.slot_of[u] for u in self.order if self.slot_of[u] not in taken]   # LRU first
        for u, slot in zip(misses, free + evictable):
            old = self.identity[slot]
            if old is not None:
                del self.slot_of[old]
                self.order.remove(old)
            self.identity[slot] = u
            self.slot_of[u] = slot
        for u in kept:
            slot = self.slot_of[u]
            t = self.toggle[slot] if u in hits else 0
            for j, feature in enumerate(features[u]):
                self.versions[slot][(t + j) % 2] = feature
            self.toggle[slot] = (t + len(features[u])) % 2
            if u in hits or len(features[u]) >= 2:
                self.refreshed.add(slot)
            if u in self.order:
                self.order.remove(u)
        self.order += sorted(kept, key=lambda u: last[u])


def dense_direction(X, Y, probe_rows, shards, num_classes, world, hard):
    """Loss of one direction after its writes, with autograd to X (float64)."""
    cols0, cols1, col_ids = [], [], []
    for sh in shards:
        for slot in range(len(sh.identity)):
            if sh.identity[slot] is not None:
                cols0.append(sh.versions[slot][0])
                cols1.append(sh.versions[slot][1] if slot in sh.refreshed else sh.versions[slot][0])
                col_ids.append(sh.identity[slot])
    owner = class_owner(Y, num_classes, world)
    probes = X[probe_rows]
    ids = Y[probe_rows].tolist()
    in_pool = torch.tensor([i in shards[int(owner[p])].slot_of for p, i in zip(probe_rows.tolist(), ids)])
    target = torch.tensor([col_ids.index(i) if ok else -1 for i, ok in zip(ids, in_pool.tolist())])
    total = X.new_zeros(())
    for cols in (cols0, cols1):
        W = F.normalize(torch.stack(cols), dim=1)
        cos = (F.normalize(probes, dim=1) @ W.t()).clamp(-1, 1)
        if in_pool.any():
            c = cos[in_pool]
            t = target[in_pool]
            ct = c.gather(1, t[:, None]).squeeze(1)
            theta = torch.acos(ct)
            psi = torch.where(theta + M2 <= math.pi, torch.cos(theta + M2), ct - M2 * math.sin(M2))
            logits = c.scatter(1, t[:, None], psi[:, None]) * SCALE
            total = total + F.cross_entropy(logits, t)
        if (~in_pool).any():
            h = min(hard, W.shape[0])
            top = cos[~in_pool].sort(dim=1, descending=True).values[:, :h]
            total = total + top.clamp_min(0).mean()
    return total


def simulate(world, seed):
    """Single-process simulation of every step: loss, d loss / d X and the committed shards."""
    num_classes, pool_size = sizes(world)
    hard = min(max(int(0.0002 * pool_size), 3), 10)
    shards = [Shard(ClassShard(pool_size, world, r).count) for r in range(world)]
    n = 2 * HALF
    side_x = (torch.arange(world)[:, None] * n + torch.arange(HALF)[None, :]).flatten()
    side_y = side_x + HALF
    out = []
    for t in range(STEPS):
        X, G, Y = step_data(world, t, seed)
        X = X.clone().requires_grad_(True)
        owner = class_owner(Y, num_classes, world)
        loss = X.new_zeros(())
        committed = shards
        for probe_rows, gallery_rows in ((side_x, side_y), (side_y, side_x)):
            shards = copy.deepcopy(committed)                # each direction starts from the committed pool
            for sh in shards:
                sh.refreshed = set()
            for r, sh in enumerate(shards):
                sh.write_batch([(int(Y[row]), F.normalize(G[row], dim=0))
                                for row in gallery_rows.tolist() if int(owner[row]) == r])
            loss = loss + dense_direction(X, Y, probe_rows, shards, num_classes, world, hard)
        loss.backward()
        out.append(dict(loss=loss.detach(), grad_x=X.grad, shards=shards))   # the second direction's pool
    return out


def test_f2c_simulated_data_writes_identities_twice_and_overflows_a_shard():
    """The batches of the test below exercise the batch rules' two less common paths somewhere."""
    repeated = dropped = 0
    for world in WORLDS:
        for step in simulate(world, 70 + world):
            repeated += sum(sh.repeated for sh in step["shards"])
            dropped += sum(sh.dropped for sh in step["shards"])
    assert repeated and dropped


def f2c_case(sub, world):
    return f2c_rank(sub, world, 70 + world)


@pytest.fixture(scope="module")
def per_world():
    return memory_head_runs()["f2c"]


@pytest.mark.parametrize("world", WORLDS)
def test_f2c_matches_dense_simulation_and_pool_state_equals_single_process_lru(per_world, world):
    sim = simulate(world, 70 + world)
    per_rank = per_world[world]
    n = 2 * HALF
    evictions = outliers = refreshes = 0
    for t, ref in enumerate(sim):
        for r in range(world):
            got = per_rank[r][t]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["grad_x"], ref["grad_x"][r * n:(r + 1) * n], rtol=1e-9, atol=1e-12)
            shard, st = ref["shards"][r], got["state"]
            assert st["identities"].tolist() == shard.order, f"rank {r} LRU order differs after step {t}"
            assert st["slots"].tolist() == [shard.slot_of[i] for i in shard.order], f"rank {r} slot layout, step {t}"
            for ident, feats, tog in zip(st["identities"].tolist(), st["features"], st["toggle"].tolist()):
                slot = shard.slot_of[ident]
                assert tog == shard.toggle[slot]
                for v in (0, 1):
                    expected = shard.versions[slot][v]
                    if expected is None:
                        assert torch.count_nonzero(feats[v]) == 0
                    else:
                        torch.testing.assert_close(feats[v], expected, rtol=0, atol=1e-15)
            refreshes += len(shard.refreshed)
        if t:
            before = set().union(*(s.order for s in sim[t - 1]["shards"]))
            after = set().union(*(s.order for s in ref["shards"]))
            evictions += len(before - after)
        _, _, Y = step_data(world, t, 70 + world)
        outliers += int(sum(int(y) not in set().union(*(s.order for s in ref["shards"])) for y in Y))
    assert evictions and outliers and refreshes, "the data must exercise eviction, outliers and refreshes"


def test_f2c_first_direction_leaves_no_trace():
    """The committed pool depends on the y -> x gallery only: changing the x -> y gallery (G of the y
    side) changes the loss but not the pool."""
    state = ParallelState.single("cpu")
    states, losses = [], []
    for variant in range(2):
        num_classes, pool_size = sizes(1)
        head = build_head(f2c_config(pool_size), state, num_classes, DIM)
        for t in range(3):
            X, G, Y = step_data(1, t, 5)
            if variant:
                G[HALF:] = torch.randn(HALF, DIM, dtype=torch.float64)    # the tentative direction's gallery
            x = X.clone().requires_grad_(True)
            res = head(x, Y, {"gallery": G})
            res.loss.backward()
            head.step(0.1)
        states.append(head.sharded_state())
        losses.append(res.loss.detach())
    assert not torch.allclose(losses[0], losses[1])
    for key in ("identities", "features", "toggle", "last_used"):
        assert torch.equal(states[0][key], states[1][key]), key


def test_f2c_pool_reslices_by_identity_owner():
    state = ParallelState.single("cpu")
    num_classes, pool_size = sizes(1)
    head = build_head(f2c_config(pool_size), state, num_classes, DIM)
    for t in range(3):
        X, G, Y = step_data(1, t, 9)
        head(X.clone().requires_grad_(True), Y, {"gallery": G}).loss.backward()
        head.step(0.1)
    saved = head.sharded_state()
    # a two-rank layout seen from rank 1: it keeps only identities it owns, in the same LRU order
    fake = ParallelState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    other = F2cHead(f2c_config(pool_size), fake, num_classes, DIM)
    other.world, other.rank = 2, 1
    other.load_sharded_state(F2cHead.merge_states([saved]))
    owned = [i for i in saved["identities"].tolist() if int(class_owner(torch.tensor(i), num_classes, 2)) == 1]
    assert other.sharded_state()["identities"].tolist() == owned[-other.slots:] and owned


def test_f2c_rejects_small_pool_odd_rows_and_missing_gallery():
    state = ParallelState.single("cpu")
    head = build_head(f2c_config(8), state, 100, 4)
    x, y = torch.randn(12, 4), torch.arange(12)
    with pytest.raises(ValueError, match=r"pool_size: 8 < 1.5 x 6, .*K >= 1.5 Bg"):
        head(x, y, {"gallery": torch.randn(12, 4)})
    head = build_head(f2c_config(9), state, 100, 4)
    with pytest.raises(ValueError, match="even row count"):
        head(x[:5], y[:5], {"gallery": torch.randn(5, 4)})
    with pytest.raises(ValueError, match=r"needs batch\['gallery'\]"):
        head(x, y, None)


def test_f2c_defaults_are_the_official_hyper_parameters():
    from parallel.heads.config import F2cConfig
    cfg = F2cConfig()
    assert (cfg.momentum, cfg.margin.scale, cfg.margin.m2, cfg.margin.m3) == (0.99, 32.0, 0.5, 0.0)
    assert F2cConfig(pool_size=100).hard_count == 3 and F2cConfig(pool_size=10**6).hard_count == 10
    head = build_head(HeadConfig(type="f2c"), ParallelState.single("cpu"), 10, 4)
    assert head.needs == ("gallery",) and not head.evaluate_with_ema and head.ema_momentum == 0.99


@pytest.mark.parametrize("kind", ["dcq", "f2c"])
def test_head_state_does_not_grow_with_the_number_of_classes(kind):
    state = ParallelState.single("cpu")
    sizes_seen = []
    for num_classes in (10**3, 10**6):
        if kind == "dcq":
            head = build_head(HeadConfig(type="dcq", extra=dict(queue_size=64)), state, num_classes, 16)
        else:
            head = build_head(HeadConfig(type="f2c", extra=dict(pool_size=64)), state, num_classes, 16)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            y = torch.randint(0, 1000, (16,), generator=g)
            x = torch.randn(16, 16, generator=g, requires_grad=True)
            batch = {"keys": torch.randn(16, 16, generator=g)} if kind == "dcq" else {"gallery": torch.randn(16, 16, generator=g)}
            if kind == "f2c":
                y[8:10] = y[:2]
            head(x, y, batch).loss.backward()
            head.step(0.1)
        sizes_seen.append((head.state_bytes(), {k: tuple(b.shape) for k, b in head.named_buffers()}))
    assert sizes_seen[0] == sizes_seen[1]


def test_f2c_gradient_accumulation_sees_the_previous_micro_batch_writes():
    """Two micro-batches before one step give the pool and losses of two steps."""
    state = ParallelState.single("cpu")
    num_classes, pool_size = sizes(1)
    runs = []
    for accumulate in (False, True):
        head = build_head(f2c_config(pool_size), state, num_classes, DIM)
        losses = []
        for t in range(4):
            X, G, Y = step_data(1, t, 13)
            losses.append(head(X.clone().requires_grad_(True), Y, {"gallery": G}).loss.detach())
            if not accumulate or t % 2:
                head.step(0.1)
        runs.append((losses, head.sharded_state()))
    torch.testing.assert_close(torch.stack(runs[0][0]), torch.stack(runs[1][0]), rtol=0, atol=0)
    for key in ("identities", "features", "toggle"):
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key
