"""The memory planner against measured peaks, and its capacity search."""
import pytest

from engine.head_bench import SWEEP_HEADS, bench_config, fill_steps, plot_sweep, sweep
from engine.plan import PlanInput, largest_classes, plan

# planned vs measured peak resident memory per rank, with the allocator returning every large free
# (bench_config(allocator="exact")): the peak RSS is then the peak of live tensors plus the process
TOLERANCE = 0.10


@pytest.mark.parametrize("head,classes,rate,storage,compute,momentum", [
    ("partial", 2_000_001, 0.1, "float32", "float32", "float32"),
    ("partial", 2_000_001, 0.1, "bfloat16", "float32", "int8"),
    ("partial", 2_000_001, 0.1, "bfloat16", "bfloat16", "int8"),
    # every row active with bfloat16 rows: the gradient is bfloat16 too, converted a block at a time
    ("full", 1_000_001, 1.0, "bfloat16", "float32", "int8")])
def test_planned_peak_matches_measured_peak_within_tolerance(head, classes, rate, storage, compute, momentum):
    rec = bench_config(classes, 128, 32, 2, rate, head=head, dtype=compute, storage_dtype=storage,
                       momentum_dtype=momentum, steps=2, warmup=1, naive=False, allocator="exact")
    measured, planned = rec["peak_rss_bytes_per_rank"], rec["planned_peak_bytes_per_rank"]
    assert abs(planned - measured) <= TOLERANCE * measured, (planned, measured, rec["baseline_rss_bytes_per_rank"], rec["planned_components"])


def test_lean_storage_takes_at_most_four_bytes_per_class_and_dimension():
    p = plan(PlanInput(classes=10_000_000, dim=512, world=2, storage_dtype="bfloat16", momentum_dtype="int8"))
    state = p.components["head_rows"] + p.components["head_optimizer_state"]
    assert state * 2 <= 4 * 10_000_000 * 512


def test_largest_classes_is_the_boundary_of_the_budget():
    inputs = PlanInput(classes=1, dim=256, world=4, storage_dtype="bfloat16", momentum_dtype="bfloat16")
    budget = 3 * 2**30
    c = largest_classes(inputs, budget)
    assert plan(PlanInput(**{**inputs.__dict__, "classes": c})).total <= budget
    assert plan(PlanInput(**{**inputs.__dict__, "classes": int(c * 1.001) + 4})).total > budget


def test_sweep_skips_what_the_planner_says_will_not_fit(tmp_path):
    # a budget below every plan: no rank is started, each configuration is reported with its plan and why
    records = sweep(classes=(100_000, 10_000_000), heads=SWEEP_HEADS, emit=lambda r: None, memory_share=1e-6)
    assert len(records) == 2 * len(SWEEP_HEADS) * 2
    assert all("skipped" in r and r["planned_peak_bytes_per_rank"] > 0 for r in records)
    assert {r["sample_rate"] for r in records if r["head"] == "full"} == {1.0}
    big = {(r["head"], r["storage_dtype"]): r["planned_peak_bytes_per_rank"] for r in records if r["classes"] == 10_000_000}
    assert big[("partial", "bfloat16")] < big[("partial", "float32")] / 2
    plot_sweep(records, str(tmp_path / "sweep.png"))   # skipped records are not plotted; the plot still forms
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_memory_heads_warm_up_until_their_queue_is_full():
    from parallel.heads.config import DcqConfig, F2cConfig
    assert fill_steps("partial", 128, 2) == 0
    assert fill_steps("dcq", 128, 2) * 256 >= DcqConfig.queue_size
    # F2C: W * B/2 gallery rows committed per step, with a margin for the unevenly drawn owners
    assert fill_steps("f2c", 128, 2) * 128 >= 1.2 * F2cConfig.pool_size
