"""Communication per head step does not grow with the number of classes."""
import torch

from parallel.collectives import count_comm_bytes
from parallel.heads import HeadConfig, build_head

HEADS = ("full", "partial", "mutual", "dcq", "f2c")
EXTRA = {"dcq": dict(queue_size=16), "f2c": dict(pool_size=16)}   # queue / pool full from the third step


def _bytes_per_step_all_heads(state, num_classes):
    return {h: _bytes_per_step(state, num_classes, h) for h in HEADS}


def _bytes_per_step(state, num_classes, head_type):
    cfg = HeadConfig(type=head_type, sample_rate=0.1, seed=1, extra=EXTRA.get(head_type, {}))
    head = build_head(cfg, state, num_classes, 16)
    gen = torch.Generator().manual_seed(state.rank)
    totals = []
    for _ in range(3):
        x = torch.randn(4, 16, generator=gen, requires_grad=True)
        labels = torch.randint(0, num_classes, (4,), generator=gen)
        batch = {key: torch.randn(4, 16, generator=gen) for key in getattr(head, "needs", ())}
        with count_comm_bytes() as comm:
            head(x, labels, batch).loss.backward()
            head.step(lr=0.1)
        totals.append(dict(comm.by_op))
    return totals


def test_bytes_per_step_are_independent_of_the_number_of_classes(spawn_ranks):
    small_all = spawn_ranks(_bytes_per_step_all_heads, 2, args=(1_001,))
    large_all = spawn_ranks(_bytes_per_step_all_heads, 2, args=(100_001,))
    for head_type in HEADS:
        small = [r[head_type] for r in small_all]
        large = [r[head_type] for r in large_all]
        for rank in range(2):
            assert small[rank] == large[rank], (head_type, small[rank], large[rank])
            assert sum(small[rank][0].values()) > 0, "the step must communicate"
