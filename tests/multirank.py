"""The multi-rank test launcher (parallel/local_ranks.py), under the name the tests import."""
from parallel.local_ranks import RankFailure, free_port, run_ranks

__all__ = ["RankFailure", "free_port", "run_ranks"]
