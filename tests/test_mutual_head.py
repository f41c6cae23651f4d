"""MutualFace head: selection, hard queues, interactions and checkpoint state against independent
single-process references (dense float64 softmax, plain-Python queue rules)."""
import math

import pytest
import torch
from reference_softmax import dense_margin_softmax

from parallel import kernels
from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, MutualConfig, OptimizerConfig
from parallel.sharding import ClassShard

SCALE = 8.0
MARGIN = dict(m1=1.0, m2=0.5, m3=0.0)
LR, MOMENTUM, WD = 0.5, 0.9, 5e-4


def mutual_config(extra, rate, seed=5, dtype="float64", chunk=4):
    return HeadConfig(type="mutual", sample_rate=rate, chunk_size=chunk, compute_dtype=dtype,
                      storage_dtype="float64" if dtype == "float64" else "float32", seed=seed,
                      margin=MarginConfig(scale=SCALE, grad="exact", **MARGIN),
                      optimizer=OptimizerConfig(momentum=MOMENTUM, weight_decay=WD), extra=dict(extra))


# -- the multi-step simulation -------------------------------------------------------------------
CASES = {
    "refresh_score": dict(queue_size=3, top_h=2, hard_share=0.5, update="score", decay=0.8,
                          interaction="refresh", refresh_alpha=0.3),
    "none_fifo": dict(queue_size=3, top_h=2, hard_share=0.5, update="fifo", interaction="none"),
    "pull_score": dict(queue_size=4, top_h=1, hard_share=0.75, update="score", decay=0.5,
                       interaction="pull", pull_weight=0.7),
    "dual_fifo": dict(queue_size=3, top_h=2, hard_share=0.5, update="fifo", interaction="dual"),
}
NUM_CLASSES, DIM, BATCH, STEPS, RATE = 29, 8, 4, 5, 0.6


def simulation_data(world, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64)
    pool = torch.arange(0, NUM_CLASSES, 3)   # labels repeat over steps so queues get used
    Xs = [torch.randn(world * BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    Ys = [pool[torch.randint(0, pool.numel(), (world * BATCH,), generator=g)] for _ in range(STEPS)]
    return W0, Xs, Ys


def rank_simulation(state, seed):
    W0, Xs, Ys = simulation_data(state.world_size, seed)
    out = {}
    for name, extra in CASES.items():
        head = build_head(mutual_config(extra, RATE), state, NUM_CLASSES, DIM)
        start, count = head.shard.span
        head.bank.weight.copy_(W0[start:start + count])
        steps = []
        for X, Y in zip(Xs, Ys):
            lo = state.rank * BATCH
            x = X[lo:lo + BATCH].clone().requires_grad_(True)
            res = head(x, Y[lo:lo + BATCH])
            res.loss.backward()
            (rows, grad), = head.pending_grads()
            steps.append(dict(active=head.last_active.rows + start, hard=head.last_hard + start,
                              loss=res.loss.detach(), grad_x=x.grad / state.data_world, grad_rows=rows + start,
                              grad=grad.clone(), stats={k: v.clone() for k, v in res.stats.items()}))
            head.step(LR)
            steps[-1].update(queue=head.hard_queue.clone(),
                             score=None if head.hard_score is None else head.hard_score.clone(),
                             weight=head.bank.weight.clone())
        out[name] = steps
    return out


def f32(v):
    return float(torch.tensor(v, dtype=torch.float32))


def random_fill(candidates, rand, start, m):
    """The m random negatives Partial FC draws from `candidates` (ascending ids) with one uniform draw
    `rand[j - start]` per class: with the CPU kernels, one ascending pass taking each candidate with
    probability (still needed) / (still unseen); otherwise the m largest draws."""
    if kernels._module() is None:
        return sorted(candidates, key=lambda j: -float(rand[j - start]))[:m]
    taken, needed, remaining = [], m, len(candidates)
    for j in candidates:
        if float(rand[j - start]) * remaining < needed:
            taken.append(j)
            needed -= 1
        remaining -= 1
    return taken


def simulate(case, world, seed):
    """The MutualFace rules, one process, plain loops; returns the same per-step records (global)."""
    c = MutualConfig(**case)
    W0, Xs, Ys = simulation_data(world, seed)
    Wt, mom = W0.clone(), torch.zeros_like(W0)
    queue = {k: [] for k in range(NUM_CLASSES)}        # class -> [(id, score)], best / newest first
    spans = ClassShard(NUM_CLASSES, world, 0).ranges()
    cfg_seed = 5
    gens = [torch.Generator().manual_seed((cfg_seed * 1_000_003 + 7919 * (r + 1)) % (1 << 63)) for r in range(world)]
    records = []
    for X, Y in zip(Xs, Ys):
        labels = Y.tolist()
        ranks = []
        for r, (start, count) in enumerate(spans):
            n = math.floor(RATE * count)
            pos = sorted({y for y in labels if start <= y < start + count})
            cap = min(math.floor(c.hard_share * n), max(0, n - len(pos)))
            best = {}
            for y in labels:
                for slot, (q, _) in enumerate(queue[y]):
                    if start <= q < start + count and q not in pos:
                        best[q] = min(best.get(q, slot), slot)
            hard = sorted(best, key=lambda q: (best[q], q))[:cap]
            k = min(max(n, len(pos)), count)
            rand = torch.rand(count, generator=gens[r])
            rest = [j for j in range(start, start + count) if j not in pos and j not in hard]
            active = sorted(pos + hard + random_fill(rest, rand, start, k - len(pos) - len(hard)))
            center_view = None
            if c.interaction == "dual":
                rand2 = torch.rand(count, generator=gens[r])
                rest2 = [j for j in range(start, start + count) if j not in pos]
                center_view = sorted(pos + random_fill(rest2, rand2, start, k - len(pos)))
            ranks.append(dict(active=active, hard=sorted(hard), positives=pos, center_view=center_view))
        # metrics of the step (before its updates): queue fill, hard share, mean cosines of (row, column) pairs
        xn = X / X.norm(dim=1, keepdim=True)
        wn = Wt / Wt.norm(dim=1, keepdim=True)
        hard_all = [j for rk in ranks for j in rk["hard"]]
        random_all = [j for rk in ranks for j in rk["active"] if j not in rk["hard"] and j not in rk["positives"]]
        metrics = dict(hard_queue_fill=sum(len(v) for v in queue.values()) / (NUM_CLASSES * c.queue_size),
                       hard_negative_share=len(hard_all) / (len(hard_all) + len(random_all)),
                       hard_negative_cos=float((xn @ wn[hard_all].t()).mean()) if hard_all else float("nan"),
                       random_negative_cos=float((xn @ wn[random_all].t()).mean()))
        A1 = torch.tensor([j for rk in ranks for j in rk["active"]])
        t1 = torch.searchsorted(A1, Y)
        loss, dX, dW1 = dense_margin_softmax(X, Wt[A1], t1, s=SCALE, **MARGIN)
        rows, grad = A1, dW1
        if c.interaction == "dual":
            A2 = torch.tensor([j for rk in ranks for j in rk["center_view"]])
            loss2, _, dW2 = dense_margin_softmax(X, Wt[A2], torch.searchsorted(A2, Y), s=SCALE, **MARGIN)
            loss = loss + loss2
            rows, grad = A2, dW2    # only the center view has a gradient to the centers, and is stepped
        elif c.interaction == "pull":
            Xv = X.clone().requires_grad_(True)
            Wa = Wt[A1].clone().requires_grad_(True)
            cos = torch.nn.functional.cosine_similarity(Xv, Wa[t1], dim=1, eps=0.0)
            term = c.pull_weight * (1 - cos).mean()
            gx, gw = torch.autograd.grad(term, (Xv, Wa))
            loss, dX, grad = loss + term.detach(), dX + gx, dW1 + gw
        # every rank's top-h negatives of each row, before the update
        xn = X / X.norm(dim=1, keepdim=True)
        cand = [[] for _ in labels]
        for rk in ranks:
            cols = torch.tensor(rk["active"])
            cos = (xn @ (Wt[cols] / Wt[cols].norm(dim=1, keepdim=True)).t()).clamp(-1, 1)
            for i, y in enumerate(labels):
                entries = sorted((-float(cos[i, j]), int(cols[j])) for j in range(len(cols)) if int(cols[j]) != y)
                cand[i] += [(q, -v) for v, q in entries[:c.top_h]]
        # sparse SGD on the rows used
        w, m = Wt[rows], mom[rows]
        m = MOMENTUM * m + grad + WD * w
        Wt[rows], mom[rows] = w - LR * m, m
        # queues
        for y in set(labels):
            new = {}
            for i, yi in enumerate(labels):
                if yi == y:
                    for q, v in cand[i]:
                        new[q] = max(new.get(q, -2.0), v)
            if c.update == "score":
                merged = {q: s * c.decay for q, s in queue[y]}
                for q, v in new.items():
                    merged[q] = max(merged.get(q, -1.0), (1 + v) / 2)
                queue[y] = [(q, f32(s)) for q, s in sorted(merged.items(), key=lambda e: (-e[1], e[0]))[:c.queue_size]]
            else:
                order = sorted(new, key=lambda q: (-new[q], q))
                order += [q for q, _ in queue[y] if q not in new]
                queue[y] = [(q, None) for q in order[:c.queue_size]]
        if c.interaction == "refresh":
            for y in set(labels):
                mean = xn[Y == y].mean(0)
                norm = Wt[y].norm()
                d = (1 - c.refresh_alpha) * Wt[y] / norm + c.refresh_alpha * mean
                Wt[y] = d / d.norm() * norm
        table = torch.full((NUM_CLASSES, c.queue_size), -1, dtype=torch.int32)
        scores = torch.full((NUM_CLASSES, c.queue_size), -1.0, dtype=torch.float32)
        for k, entries in queue.items():
            for slot, (q, s) in enumerate(entries):
                table[k, slot] = q
                scores[k, slot] = s if s is not None else -1.0
        records.append(dict(ranks=ranks, loss=loss, dX=dX, rows=rows, grad=grad, queue=table, score=scores,
                            weight=Wt.clone(), metrics=metrics))
    return records


# One spawn per world size serves every multi-rank test below (spawning dominates their runtime).
_SPAWNED: dict = {}


def rank_all(state):
    out = {"simulation": rank_simulation(state, 100 + state.world_size)}
    if state.world_size == 3:
        out["known"] = rank_known(state, KNOWN_EXTRAS)
    if state.world_size == 2:
        out["checkpoint"] = rank_checkpoint(state)
    return out


def spawned(spawn_ranks, world, part):
    if world not in _SPAWNED:
        _SPAWNED[world] = spawn_ranks(rank_all, world)
    return [pr[part] for pr in _SPAWNED[world]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mutual_matches_single_process_simulation_and_dense_reference_uneven_shards(spawn_ranks, world):
    seed = 100 + world
    per_rank = spawned(spawn_ranks, world, "simulation")
    for name, case in CASES.items():
        ref = simulate(case, world, seed)
        hard_used = random_used = 0
        for t, want in enumerate(ref):
            got = [pr[name][t] for pr in per_rank]
            for r, (g, rk) in enumerate(zip(got, want["ranks"])):
                assert g["active"].tolist() == rk["active"], (name, t, r)
                assert sorted(g["hard"].tolist()) == rk["hard"], (name, t, r)
                torch.testing.assert_close(g["loss"], want["loss"], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(g["grad_x"], want["dX"][r * BATCH:(r + 1) * BATCH], rtol=1e-9, atol=1e-12)
                hard_used += len(rk["hard"])
                random_used += len(rk["active"]) - len(rk["hard"]) - len(rk["positives"])
            assert torch.equal(torch.cat([g["grad_rows"] for g in got]), want["rows"]), (name, t)
            torch.testing.assert_close(torch.cat([g["grad"] for g in got]), want["grad"], rtol=1e-9, atol=1e-12)
            assert torch.equal(torch.cat([g["queue"] for g in got]), want["queue"]), (name, t)
            if case["update"] == "score":
                torch.testing.assert_close(torch.cat([g["score"] for g in got]), want["score"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(torch.cat([g["weight"] for g in got]), want["weight"], rtol=1e-9, atol=1e-12)
            for g in got:  # the metrics are global figures: the same on every rank
                for key, value in want["metrics"].items():
                    torch.testing.assert_close(g["stats"][key].double(), torch.tensor(value, dtype=torch.float64),
                                               rtol=1e-9, atol=1e-12, equal_nan=True, msg=f"{name} step {t} {key}")
        # the run exercised both the queue and the random fill
        assert hard_used > 0 and random_used > 0, name


# -- known answer: the queue holds the hardest active negatives of its rows ----------------------------
KNOWN_CLASSES, KNOWN_DIM = 20, 20
# rows per step: (label, {negative class: coefficient}); x = 5 e_label + sum coefficient e_class
KNOWN_ROWS = [
    [(0, {7: 0.9, 14: 0.8, 1: 0.7, 19: 0.6, 8: 0.5}), (8, {0: 0.4, 15: 1.1, 9: 0.2, 16: 0.3}),
     (15, {3: 0.6, 4: 0.65, 16: 0.7, 10: 0.1}),
     (0, {2: 0.95, 7: 0.3, 16: 0.85}), (19, {18: 0.5, 12: 0.55, 5: 0.45, 6: 0.35}), (3, {13: 0.2, 11: 0.25, 17: 0.3})],
    [(0, {5: 1.2, 14: 0.1, 18: 0.2}), (8, {15: 0.05, 2: 0.6, 9: 0.7}), (15, {4: 0.9, 17: 0.2, 11: 0.15}),
     (19, {12: 0.1, 1: 0.3, 0: 0.2}), (3, {13: 0.8, 10: 0.7, 6: 0.6}), (0, {7: 1.0, 6: 0.01, 3: 0.02})],
]


KNOWN_EXTRAS = {"score": dict(queue_size=3, top_h=3, update="score", decay=0.5, interaction="none"),
                "fifo": dict(queue_size=5, top_h=3, update="fifo", interaction="none")}


def known_embeddings(step):
    X = torch.zeros(len(KNOWN_ROWS[step]), KNOWN_DIM, dtype=torch.float64)
    Y = torch.tensor([y for y, _ in KNOWN_ROWS[step]])
    for i, (y, negs) in enumerate(KNOWN_ROWS[step]):
        X[i, y] = 5.0
        for k, a in negs.items():
            X[i, k] = a
    return X, Y


def rank_known(state, extras):
    out = {}
    for name, extra in extras.items():
        cfg = mutual_config(extra, 1.0)
        head = build_head(cfg, state, KNOWN_CLASSES, KNOWN_DIM)
        start, count = head.shard.span
        head.bank.weight.copy_(torch.eye(KNOWN_CLASSES, dtype=torch.float64)[start:start + count])
        queues = []
        for step in range(2):
            X, Y = known_embeddings(step)
            b = X.shape[0] // state.world_size
            head(X[state.rank * b:(state.rank + 1) * b], Y[state.rank * b:(state.rank + 1) * b]).loss.backward()
            head.step(0.0)   # centers stay the identity: the cosines are known
            queues.append((head.hard_queue.clone(), None if head.hard_score is None else head.hard_score.clone()))
        out[name] = queues
    return out


KNOWN_SPANS = ClassShard(KNOWN_CLASSES, 3, 0).ranges()   # (0, 7), (7, 7), (14, 6)


def known_cosines(step):
    """Every row's cosine with every class center e_k: x_k / |x| (the centers are the identity)."""
    X, Y = known_embeddings(step)
    return X / X.norm(dim=1, keepdim=True), Y


def known_candidates(step, h):
    """class -> {negative id: best cosine}, from every rank's top-h negatives of each of its rows
    (rho = 1: every class is active; ties to the lower id)."""
    cos, Y = known_cosines(step)
    out = {}
    for i, y in enumerate(Y.tolist()):
        for start, count in KNOWN_SPANS:
            negs = sorted((-float(cos[i, k]), k) for k in range(start, start + count) if k != y)[:h]
            for v, k in negs:
                out.setdefault(y, {})
                out[y][k] = max(out[y].get(k, -2.0), -v)
    return out


def test_queue_holds_exactly_the_hardest_active_negatives_of_its_rows(spawn_ranks):
    # W = 3: the hard negatives of a row live on several ranks. With Q = h = 3, after one step a class's
    # queue is the 3 highest cosines over all negatives of all its rows, best first
    per_rank = spawned(spawn_ranks, 3, "known")
    score_q = [torch.cat([pr["score"][s][0] for pr in per_rank]) for s in range(2)]
    score_v = [torch.cat([pr["score"][s][1] for pr in per_rank]) for s in range(2)]
    fifo_q = [torch.cat([pr["fifo"][s][0] for pr in per_rank]) for s in range(2)]
    cos, Y = known_cosines(0)
    for y in set(Y.tolist()):
        rows = (Y == y).nonzero().flatten().tolist()
        best = {k: max(float(cos[i, k]) for i in rows) for k in range(KNOWN_CLASSES) if k != y}
        top = sorted(best, key=lambda k: (-best[k], k))[:3]
        assert score_q[0][y].tolist() == top, y
        torch.testing.assert_close(score_v[0][y].double(), torch.tensor([(1 + best[k]) / 2 for k in top],
                                                                         dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert score_q[0][0].tolist() == [2, 7, 16]          # class 0: rows 0 and 3 together
    untouched = [k for k in range(KNOWN_CLASSES) if k not in set(Y.tolist())]
    assert (score_q[0][untouched] == -1).all() and (fifo_q[0][untouched] == -1).all()
    step1 = known_candidates(0, 3)
    for y, cands in step1.items():      # fifo from empty: the candidates by cosine
        assert fifo_q[0][y].tolist() == sorted(cands, key=lambda k: (-cands[k], k))[:5], y
    # step 2: score = max(old * decay, (1 + cos) / 2); fifo = this step's candidates by cosine, then the old order
    for y, cands in known_candidates(1, 3).items():
        merged = {int(k): float(v) * 0.5 for k, v in zip(score_q[0][y], score_v[0][y]) if k >= 0}
        for k, c in cands.items():
            merged[k] = max(merged.get(k, -1.0), (1 + c) / 2)
        assert score_q[1][y].tolist() == sorted(merged, key=lambda k: (-merged[k], k))[:3], y
        newest = sorted(cands, key=lambda k: (-cands[k], k))
        newest += [int(k) for k in fifo_q[0][y] if k >= 0 and int(k) not in cands]
        assert fifo_q[1][y].tolist() == (newest + [-1] * 5)[:5], y


# -- the cap and the random fill ----------------------------------------------------------------------
def test_hard_negative_cap_and_random_fill_are_respected():
    state = ParallelState.single("cpu")
    extra = dict(queue_size=8, top_h=2, hard_share=0.25, update="fifo", interaction="none")
    head = build_head(mutual_config(extra, 0.5, dtype="float32"), state, 40, 8)    # n = 20, cap 5
    head.hard_queue[3] = torch.tensor([20, 10, 22, 23, 24, 25, 26, 27], dtype=torch.int32)   # 10 is a positive
    head.hard_queue[10] = torch.tensor([30, 21, 31, 32, 33, 34, 35, 36], dtype=torch.int32)
    head.hard_queue[5] = torch.tensor([39, 38, 37, -1, -1, -1, -1, -1], dtype=torch.int32)  # not in the batch
    labels = torch.tensor([3, 10, 3, 10])
    out = head(torch.randn(4, 8), labels)
    # slot 0: 20, 30; slot 1: 21 (10 is a positive); slot 2: 22, 31 -> exactly five, best slots first
    assert sorted(head.last_hard.tolist()) == [20, 21, 22, 30, 31]
    rows = set(head.last_active.rows.tolist())
    assert len(rows) == 20 and {3, 10} | {20, 21, 22, 30, 31} <= rows
    assert len(rows - {3, 10, 20, 21, 22, 30, 31}) == 13          # the rest is random fill
    assert float(out.stats["hard_negative_share"]) == pytest.approx(5 / 18)
    # a cap above the candidates: every queued negative, the rest random
    head = build_head(mutual_config(dict(extra, hard_share=1.0), 0.5, dtype="float32"), state, 40, 8)
    head.hard_queue.copy_(torch.full_like(head.hard_queue, -1))
    head.hard_queue[3, :3] = torch.tensor([20, 21, 22], dtype=torch.int32)
    head(torch.randn(4, 8), labels)
    assert sorted(head.last_hard.tolist()) == [20, 21, 22] and head.last_active.num_active == 20
    # positives beyond n: positives only
    head = build_head(mutual_config(dict(extra, hard_share=1.0), 0.025, dtype="float32"), state, 40, 8)  # n = 1
    head.hard_queue[3, :3] = torch.tensor([20, 21, 22], dtype=torch.int32)
    head(torch.randn(4, 8), labels)
    assert head.last_active.rows.tolist() == [3, 10] and head.last_hard.numel() == 0


# -- memory ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update,bytes_per_slot", [("fifo", 4), ("score", 8)])
def test_queue_memory_is_four_bytes_per_slot_plus_scores(update, bytes_per_slot):
    state = ParallelState.single("cpu")
    classes, q = 1000, 16
    base = HeadConfig(type="partial", sample_rate=0.1)
    partial = build_head(base, state, classes, 32)
    mutual = build_head(HeadConfig(type="mutual", sample_rate=0.1, extra=dict(queue_size=q, update=update)),
                        state, classes, 32)

    def state_bytes(module):
        return sum(t.untyped_storage().nbytes() for t in module.buffers())

    overhead = state_bytes(mutual) - state_bytes(partial)
    assert overhead == bytes_per_slot * classes * q == mutual.queue_memory_bytes


# -- checkpoint state --------------------------------------------------------------------------------
def rank_checkpoint(state):
    W0, Xs, Ys = simulation_data(state.world_size, 7)
    cfg = mutual_config(CASES["refresh_score"], RATE)

    def run(head, t):
        lo = state.rank * BATCH
        out = head(Xs[t][lo:lo + BATCH].clone().requires_grad_(True), Ys[t][lo:lo + BATCH])
        out.loss.backward()
        head.step(LR)
        return out.loss.detach()

    a = build_head(cfg, state, NUM_CLASSES, DIM)
    for t in range(3):
        run(a, t)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.sharded_state().items()}
    b = build_head(cfg, state, NUM_CLASSES, DIM)
    b.load_sharded_state(saved)
    loss_a, loss_b = run(a, 3), run(b, 3)
    return dict(saved=saved, same_loss=bool(loss_a == loss_b),
                same_queue=bool(torch.equal(a.hard_queue, b.hard_queue) and torch.equal(a.hard_score, b.hard_score)))


def test_queues_are_sharded_state_by_class_range_and_restore_exactly(spawn_ranks):
    per_rank = spawned(spawn_ranks, 2, "checkpoint")
    assert all(pr["same_loss"] and pr["same_queue"] for pr in per_rank)
    saved = [pr["saved"] for pr in per_rank]
    assert [(s["class_start"], s["class_count"]) for s in saved] == ClassShard(NUM_CLASSES, 2, 0).ranges()
    assert all(tuple(s["hard_queue"].shape) == (s["class_count"], 3) for s in saved)
    assert any((s["hard_queue"] >= 0).any() for s in saved)
    # re-sliced by class id for one rank: the concatenation is the whole table, and it loads
    merged = {k: torch.cat([s[k] for s in saved]) for k in ("weight", "momentum", "hard_queue", "hard_score")}
    merged.update(class_start=0, class_count=NUM_CLASSES)
    head = build_head(mutual_config(CASES["refresh_score"], RATE), ParallelState.single("cpu"), NUM_CLASSES, DIM)
    head.load_sharded_state(merged)
    assert torch.equal(head.hard_queue, merged["hard_queue"]) and torch.equal(head.hard_score, merged["hard_score"])
    assert head.sharded_state()["hard_queue"] is head.hard_queue
    bad = dict(merged, hard_queue=merged["hard_queue"][:, :2])
    with pytest.raises(ValueError, match=r"'hard_queue' has shape \(29, 2\), expected \(29, 3\)"):
        head.load_sharded_state(bad)
    fifo = build_head(mutual_config(dict(CASES["refresh_score"], update="fifo"), RATE), ParallelState.single("cpu"),
                      NUM_CLASSES, DIM)
    no_score = {k: v for k, v in merged.items() if k != "hard_score"}
    fifo.load_sharded_state(no_score)
    with pytest.raises(ValueError, match="has no 'hard_score'"):
        head.load_sharded_state(no_score)


# -- config ------------------------------------------------------------------------------------------
def test_mutual_options_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match=r"head.extra.queue_sise: unknown key"):
        HeadConfig(type="mutual", extra=dict(queue_sise=4)).validate()
    with pytest.raises(ValueError, match=r"head.extra.update: 'lru' is not one of score, fifo"):
        HeadConfig(type="mutual", extra=dict(update="lru")).validate()
    with pytest.raises(ValueError, match=r"head.extra.hard_share: 1.5 must be within"):
        HeadConfig(type="mutual", extra=dict(hard_share=1.5)).validate()
    with pytest.raises(ValueError, match=r"head.extra.interaction: 'both'"):
        HeadConfig(type="mutual", extra=dict(interaction="both")).validate()
