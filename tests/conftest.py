import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from multirank import run_ranks  # noqa: E402


@pytest.fixture
def spawn_ranks():
    """`spawn_ranks(fn, world_size, args=(...))` -> list of per-rank results (see tests/multirank.py)."""
    return run_ranks
