import pytest
import torch
import torch.distributed as dist
from multirank import RankFailure


def _sum_of_ranks(state):
    t = torch.tensor([float(state.rank + 1)])
    dist.all_reduce(t, group=state.head_group)
    return {"rank": state.rank, "world": state.world_size, "sum": t.item()}


def _fail_on_rank_one(state):
    if state.rank == 1:
        raise ValueError("deliberate failure on rank one")
    return state.rank


def _hang_on_rank_zero(state):
    import time
    if state.rank == 0:
        time.sleep(60)
    return state.rank


def test_fixture_returns_every_ranks_result(spawn_ranks):
    out = spawn_ranks(_sum_of_ranks, 3)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["sum"] == 6.0 and o["world"] == 3 for o in out)


def test_fixture_reports_a_raising_rank_with_its_traceback(spawn_ranks):
    with pytest.raises(RankFailure, match="rank 1 of 2 raised:(.|\n)*deliberate failure on rank one"):
        spawn_ranks(_fail_on_rank_one, 2)


def test_fixture_reports_a_hanging_rank(spawn_ranks):
    with pytest.raises(RankFailure, match=r"ranks \[0\] of 2 did not finish"):
        spawn_ranks(_hang_on_rank_zero, 2, timeout=8)
