"""The planner's side of slow links: predicted sync time, islands and H (pure, no devices)."""

from __future__ import annotations

import pytest

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import PlanError
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.hardware import ring_allreduce_s
from chipfuse.plan.islands import island_layout, propose_sync, sync_comm_s
from chipfuse.plan.plan import SyncPlan, data_parallel_plan

GRAD_BYTES = 3.5e6
COMPUTE_S = 0.12


def _pool(links: list[tuple[str, str, float, float]], nodes: dict[str, int]) -> object:
    return pool_from_dict({
        "name": "sites",
        "node": [{"name": n, "intra_gbs": 100, "device": [{"name": f"{n}_", "chip": "cpu", "count": k}]}
                 for n, k in nodes.items()],
        "link": [{"nodes": [a, b], "bandwidth_gbit_s": bw, "latency_ms": lat} for a, b, bw, lat in links],
    })


def _devices(pool) -> list[str]:
    return [d.name for d in pool.devices]


def test_fast_link_stays_synchronous():
    pool = _pool([("a", "b", 400, 0.01)], {"a": 2, "b": 1})
    adv = propose_sync(pool, _devices(pool), grad_bytes=GRAD_BYTES, compute_s=COMPUTE_S)
    assert adv.sync == SyncPlan() and adv.cross_link is None
    assert adv.sync_comm_s < 0.1 * COMPUTE_S


def test_slow_link_splits_into_islands_with_smallest_h():
    pool = _pool([("a", "b", 0.1, 20)], {"a": 2, "b": 1})
    adv = propose_sync(pool, _devices(pool), grad_bytes=GRAD_BYTES, compute_s=COMPUTE_S)
    assert adv.sync.islands == (("a_0", "a_1"), ("b_",))
    # Synchronous: the slow link carries the whole fp32 gradient (2 islands: 1 x bytes) every step.
    assert adv.sync_comm_s == pytest.approx(
        sync_comm_s(pool, _devices(pool), GRAD_BYTES))
    assert adv.sync_comm_s > GRAD_BYTES / (0.1e9 / 8)
    # H is the smallest that brings the amortised bf16 cross-island all-reduce within 10% of compute.
    outer_s = ring_allreduce_s(GRAD_BYTES / 2, 2, 0.1e9 / 8, 0.02)
    inner_s = adv.island_comm_s - outer_s / adv.sync.outer_every
    h = adv.sync.outer_every
    assert inner_s + outer_s / h <= 0.1 * COMPUTE_S < inner_s + outer_s / (h - 1)
    assert adv.predicted_speedup > 3


def test_fast_pair_and_slow_third_site():
    pool = _pool([("a", "b", 400, 0.01), ("a", "c", 0.1, 20), ("b", "c", 0.1, 30)], {"a": 1, "b": 1, "c": 1})
    adv = propose_sync(pool, _devices(pool), grad_bytes=GRAD_BYTES, compute_s=COMPUTE_S)
    assert adv.sync.islands == (("a_", "b_"), ("c_",))
    assert adv.cross_link is not None and adv.cross_link.latency_s == pytest.approx(0.03)


def test_h_is_capped():
    pool = _pool([("a", "b", 0.001, 500)], {"a": 1, "b": 1})
    adv = propose_sync(pool, _devices(pool), grad_bytes=GRAD_BYTES, compute_s=COMPUTE_S, max_outer_every=50)
    assert adv.sync.outer_every == 50


def test_island_layout_from_plan():
    plan = data_parallel_plan(SPEC_PRESETS["tiny"], {"x": 4, "y": 4, "z": 2}, seq_len=32, micro_batch_size=4)
    assert island_layout(plan) == (("x", "y", "z"),)
    two = plan.__class__(**{**plan.__dict__, "sync": SyncPlan(islands=(("z",), ("x", "y")), outer_every=8)})
    assert island_layout(two) == (("z",), ("x", "y"))
    bad = plan.__class__(**{**plan.__dict__, "sync": SyncPlan(islands=(("x",), ("y",)))})
    with pytest.raises(PlanError, match="every device"):
        island_layout(bad)
