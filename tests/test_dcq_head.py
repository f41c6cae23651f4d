"""DCQ head: loss and gradients against a single-process dense float64 reference, the sharded queue
against the global FIFO, re-slicing a queue at another world size, and validation."""
import pytest
import torch
import torch.nn.functional as F
from test_dcq_softmax import WORLDS, memory_head_runs

from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head
from parallel.heads.dcq import DcqHead

SCALE, MARGIN = 8.0, 0.3


def dcq_config(queue_size, layout, chunk=3):
    return HeadConfig(type="dcq", compute_dtype="float64", storage_dtype="float64", chunk_size=chunk,
                      extra=dict(queue_size=queue_size, layout=layout,
                                 margin=dict(m1=1.0, m2=0.0, m3=MARGIN, scale=SCALE)))


def step_data(world, batch, dim, step, seed):
    """Global queries, keys and labels of one step (few labels: same-identity keys are common)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    bg = world * batch
    X = torch.randn(bg, dim, generator=g, dtype=torch.float64)
    K = torch.randn(bg, dim, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 7, (bg,), generator=g)
    return X, K, Y


def run_steps(head, state, world, batch, dim, steps, seed, first=0):
    out = []
    r = state.head_rank
    for t in range(first, first + steps):
        X, K, Y = step_data(world, batch, dim, t, seed)
        x = X[r * batch:(r + 1) * batch].clone().requires_grad_(True)
        res = head(x, Y[r * batch:(r + 1) * batch], {"keys": K[r * batch:(r + 1) * batch]})
        res.loss.backward()
        head.step(0.1)
        out.append(dict(loss=res.loss.detach(), grad_x=x.grad / state.data_world, state=head.sharded_state(),
                        fill=float(res.stats["queue_fill"])))
    return out


def dcq_rank(state, world, batch, dim, queue_size, steps, seed, reload_state):
    out = {}
    for layout in ("sharded", "replicated"):
        head = build_head(dcq_config(queue_size, layout), state, 1000, dim)
        out[layout] = run_steps(head, state, world, batch, dim, steps, seed)
    # a queue saved by another world size (here: one process), re-sliced onto this one, then trained on
    head = build_head(dcq_config(queue_size, "sharded", chunk=10**6), state, 1000, dim)
    head.load_sharded_state(reload_state)
    out["reloaded"] = run_steps(head, state, world, batch, dim, 2, seed, first=steps)
    return out


class GlobalFifo:
    """The single-process DCQ queue: the last K normalized keys with labels and positions."""

    def __init__(self, size):
        self.size = size
        self.positions, self.keys, self.labels = [], [], []

    def push(self, keys, labels):
        for k, y in zip(keys, labels):
            self.positions.append(len(self.positions) and self.positions[-1] + 1)
            self.keys.append(F.normalize(k, dim=0))
            self.labels.append(int(y))
        self.positions, self.keys, self.labels = (v[-self.size:] for v in (self.positions, self.keys, self.labels))

    def tensors(self):
        if not self.keys:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return torch.tensor(self.positions), torch.stack(self.keys), torch.tensor(self.labels)


def dense_dcq_loss(X, K, Y, queue_keys, queue_labels):
    """CE over [s (cos(q, k) - m), s cos(q, Q_j) for queue keys of other labels], target 0."""
    X = X.clone().requires_grad_(True)
    q = F.normalize(X, dim=1)
    pos = (q * F.normalize(K, dim=1)).sum(1, keepdim=True)
    logits = [SCALE * (pos - MARGIN)]
    if queue_keys.shape[0]:
        neg = q @ F.normalize(queue_keys, dim=1).t()
        logits.append((SCALE * neg).masked_fill(Y[:, None] == queue_labels[None, :], float("-inf")))
    loss = F.cross_entropy(torch.cat(logits, 1), torch.zeros(X.shape[0], dtype=torch.long))
    loss.backward()
    return loss.detach(), X.grad


def merged(states):
    return DcqHead.merge_states(states)


BATCH, DIM, STEPS = 2, 5, 7       # the queue holds 3 global batches: it wraps twice


def problem(world):
    """(seed, queue size, the global FIFO after STEPS steps as a one-process queue state)."""
    seed, bg = 40 + world, world * BATCH
    fifo = GlobalFifo(3 * bg)
    for t in range(STEPS):
        _, K, Y = step_data(world, BATCH, DIM, t, seed)
        fifo.push(K, Y)
    p, k, y = fifo.tensors()
    return seed, 3 * bg, {"kind": "dcq_queue", "queue_size": 3 * bg, "next_position": STEPS * bg,
                          "positions": p, "keys": k, "labels": y}


def dcq_case(sub, world):
    seed, queue_size, reload_state = problem(world)
    return dcq_rank(sub, world, BATCH, DIM, queue_size, STEPS, seed, reload_state)


@pytest.fixture(scope="module")
def per_world():
    return memory_head_runs()["dcq"]


@pytest.mark.parametrize("world", WORLDS)
def test_dcq_matches_dense_reference_and_sharded_queue_is_the_global_fifo(per_world, world):
    batch, dim, steps = BATCH, DIM, STEPS
    bg = world * batch
    seed, queue_size, _ = problem(world)
    per_rank = per_world[world]

    fifo = GlobalFifo(queue_size)
    masked_any = False
    for t in range(steps + 2):
        X, K, Y = step_data(world, batch, dim, t, seed)
        p, qk, qy = fifo.tensors()
        masked_any |= bool((Y[:, None] == qy[None, :]).any())
        loss, dX = dense_dcq_loss(X, K, Y, qk, qy)
        layouts = ("sharded", "replicated") if t < steps else ("reloaded",)
        for layout in layouts:
            i = t if t < steps else t - steps
            for r in range(world):
                got = per_rank[r][layout][i]
                torch.testing.assert_close(got["loss"], loss, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(got["grad_x"], dX[r * batch:(r + 1) * batch], rtol=1e-10, atol=1e-13)
            assert per_rank[0][layout][i]["fill"] == pytest.approx(min(t, 3) * bg / queue_size)
        fifo.push(K, Y)
        p, qk, qy = fifo.tensors()
        for layout in layouts:
            i = t if t < steps else t - steps
            union = merged([per_rank[r][layout][i]["state"] for r in range(world)])
            order = torch.argsort(union["positions"])
            assert torch.equal(union["positions"][order], p), f"{layout} queue != global FIFO after step {t}"
            torch.testing.assert_close(union["keys"][order], qk, rtol=0, atol=1e-15)
            assert torch.equal(union["labels"][order], qy)
    assert masked_any, "the data must put same-identity keys in the queue"


def test_dcq_rejects_queue_not_multiple_of_global_batch_and_missing_keys():
    state = ParallelState.single("cpu")
    head = build_head(dcq_config(10, "sharded"), state, 100, 4)
    x, y = torch.randn(4, 4), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"queue_size: 10 must be a multiple of the global batch 4"):
        head(x, y, {"keys": torch.randn(4, 4)})
    head = build_head(dcq_config(8, "sharded"), state, 100, 4)
    with pytest.raises(ValueError, match=r"needs batch\['keys'\]"):
        head(x, y, {})
    with pytest.raises(ValueError, match=r"batch\['keys'\] must be \(4, 4\), got \(3, 4\)"):
        head(x, y, {"keys": torch.randn(3, 4)})
    with pytest.raises(ValueError, match="head.margin is not used by a dcq head"):
        HeadConfig(type="dcq", margin=HeadConfig().margin.__class__(scale=30.0)).validate()


def test_dcq_defaults_are_the_official_hyper_parameters():
    from parallel.heads.config import DcqConfig
    cfg = DcqConfig()
    assert (cfg.queue_size, cfg.momentum, cfg.margin.m3, cfg.margin.scale, cfg.margin.m2) == (8192, 0.999, 0.3, 50.0, 0.0)
    head = build_head(HeadConfig(type="dcq"), ParallelState.single("cpu"), 10, 4)
    assert head.needs == ("keys",) and head.evaluate_with_ema and head.ema_momentum == 0.999


def test_a_ring_state_with_gaps_is_refilled_from_slot_zero():
    """Columns are the ring's first `filled` slots: an own state whose keys sit elsewhere is
    compacted on load (FIFO order), and the columns are exactly its keys."""
    head = build_head(dcq_config(8, "sharded"), ParallelState.single("cpu"), 100, 4)
    keys = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    state = {"kind": "dcq_queue", "queue_size": 8, "next_position": 9, "layout": "sharded", "world_size": 1,
             "rank": 0, "positions": torch.tensor([7, 5, 6]), "keys": keys, "labels": torch.tensor([30, 10, 20]),
             "slots": torch.tensor([6, 1, 4]), "pointer": 7}
    head.load_sharded_state(state)
    centers, labels = head.columns()
    assert labels.tolist() == [10, 20, 30] and head.filled == 3 and head.pointer == 3
    torch.testing.assert_close(centers, keys[[1, 2, 0]].to(centers.dtype), rtol=0, atol=0)
