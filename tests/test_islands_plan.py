"""The planner's side of slow links: predicted sync time, islands and H (pure, no devices)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import PlanError
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.cost import predict
from chipfuse.plan.hardware import PoolIndex, ring_allreduce_s
from chipfuse.plan.islands import (
    advise_sync,
    island_layout,
    island_sync_s,
    propose_sync,
    sync_comm_s,
)
from chipfuse.plan.offers import best_with_islands
from chipfuse.plan.plan import Plan, Replica, Stage, SyncPlan, data_parallel_plan
from chipfuse.plan.search import search

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


def test_cost_model_amortises_the_cross_island_sync():
    pool = _pool([("a", "b", 0.1, 20)], {"a": 2, "b": 2})
    plan = data_parallel_plan(SPEC_PRESETS["small"], {"a_0": 4, "a_1": 4, "b_0": 4, "b_1": 4}, seq_len=64,
                              micro_batch_size=4)
    isl = replace(plan, sync=SyncPlan(islands=(("a_0", "a_1"), ("b_0", "b_1")), outer_every=8, compression="bf16"))
    nbytes = 1e6  # fp32 gradients (the plan's dtype) of 0.25M parameters
    ix = PoolIndex(pool, None, plan.dtype)
    cross = ring_allreduce_s(0.25e6 * 2, 2, 0.1e9 / 8, 0.02)  # their bf16 pseudo-gradient, 2 islands
    # One node per island: nothing to reduce inside an island, the cross-island ring every 8 steps.
    assert island_sync_s(isl, ix, ["a", "b"], nbytes) == pytest.approx(cross / 8)
    assert island_sync_s(plan, ix, ["a", "b"], nbytes) is None
    assert predict(isl, pool).step_s < predict(plan, pool).step_s / 5


def test_plan_search_result_runs_as_islands_when_that_is_faster():
    pool = _pool([("a", "b", 0.1, 20)], {"a": 2, "b": 2})
    # Enough compute per step that the cross-island sync, spread over H, costs less than leaving
    # a site out (at batch 2 the planner rightly keeps one site: tested below).
    res = search(pool, SPEC_PRESETS["small"], global_batch=128, seq_len=64, time_budget_s=1.0)
    best, adv = best_with_islands(res, pool)
    assert adv.sync.islands == (("a_0", "a_1"), ("b_0", "b_1"))
    assert best.plan.sync == adv.sync and len(best.plan.devices) == 4
    assert best.prediction.tokens_per_s >= res.prediction.tokens_per_s
    small = search(pool, SPEC_PRESETS["small"], global_batch=2, seq_len=64, time_budget_s=1.0)
    best, adv = best_with_islands(small, pool)
    assert best.plan == small.plan and len(best.plan.devices) == 2


def test_islands_are_offered_and_applied_only_when_asked():
    from chipfuse.plan.offers import offers

    pool = _pool([("a", "b", 0.1, 20)], {"a": 2, "b": 2})
    res = search(pool, SPEC_PRESETS["small"], global_batch=128, seq_len=64, time_budget_s=1.0)
    shown, offered, adv = offers(res, pool, None)  # default: sync
    assert shown.plan == res.plan and not shown.plan.sync.islands
    isl = next(o for o in offered if o.name == "DiLoCo islands")
    assert not isl.applied and isl.speedup > 1 and "loss" in isl.loss_cost and isl.apply == "--sync islands"
    for mode in ("auto", "islands"):
        shown, offered, _ = offers(res, pool, None, sync=mode)
        assert shown.plan.sync == adv.sync and next(o for o in offered if o.name == "DiLoCo islands").applied
    assert any(o.name == "8-bit optimizer state" and o.memory_saved_bytes > 0 for o in offered)


def test_islands_hold_pipelines_but_never_split_one():
    pool = _pool([("a", "b", 0.1, 20)], {"a": 2, "b": 2})
    spec = SPEC_PRESETS["small"]
    stages = lambda a, b: (Stage(devices=(a,), first_layer=0, num_layers=2),  # noqa: E731
                           Stage(devices=(b,), first_layer=2, num_layers=2))
    plan = Plan(model=spec, global_batch=8, seq_len=64,
                replicas=(Replica(stages=stages("a_0", "a_1"), batch_share=4, micro_batch_size=2),
                          Replica(stages=stages("b_0", "b_1"), batch_share=4, micro_batch_size=2)))
    adv = advise_sync(plan, pool, compute_s=0.01)
    assert adv.sync.islands == (("a_0", "a_1"), ("b_0", "b_1"))  # each site's pipeline is an island
    across = replace(plan, replicas=(Replica(stages=stages("a_0", "b_0"), batch_share=4, micro_batch_size=2),
                                     Replica(stages=stages("a_1", "b_1"), batch_share=4, micro_batch_size=2)))
    adv = advise_sync(across, pool, compute_s=0.01)
    assert adv.sync == SyncPlan() and "cross the slow link" not in adv.reason and "spans islands" in adv.reason
