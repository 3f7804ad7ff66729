"""Plans of unequal pipeline stages and unequal replicas give the single-device result."""

from __future__ import annotations

import pytest
import torch

from chipfuse.errors import PlanError
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from chipfuse.runtime.parallel.topology import check_runnable, layout, unit_ranks
from tests.distributed import run_ranks
from tests.pipeline_helpers import TINY_GPT, plan_of, pool_of, reference, run_steps

STEPS = 50
CFG = WorkerConfig(pace=False, lr=3e-3)  # pacing only sleeps; it changes no number


def _check_parity(results: list[dict], ref: dict, *, curve_atol: float) -> None:
    # Gradients of step 0: every replica's copy of every parameter equals the one-device gradient.
    # The sums run in another order (per micro-batch, then across replicas), so equality holds to
    # fp32 rounding of a sum of ~10 terms of size ~1e-2: atol 1e-6 / rtol 1e-5 is a few ulps.
    for r in results:
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], atol=1e-6, rtol=1e-5, msg=name)
    # The loss curve: identical data and weights, so only rounding differs; AdamW divides by
    # sqrt(v), which amplifies rounding on tiny gradients: over 50 steps we measured up to 1.5e-4, and
    # 6.3e-4 with torch 2.13 at step 48 (relative 2e-4 of a loss near 3; the same before and after the
    # one-worker merge); 1e-3 leaves room and still catches any wrong sample or share (>= 1e-2).
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]),
                                   atol=curve_atol, rtol=0)
    assert ref["losses"][-1] < ref["losses"][0] - 0.5  # it really trains


@pytest.mark.slow
def test_two_unequal_stages_times_two_unequal_replicas_match_one_device():
    # 4 ranks are unavoidable here: 2 stages x 2 replicas. Splits differ between replicas
    # (1+2 vs 2+1 layers), so gradients are reduced over per-layer rank sets; shares 5 and 3
    # with micro-batches of 2 and 1 (replica 0's last micro-batch is padded).
    pool = pool_of({"a0": ("cpu", 1.0), "a1": ("cpu", 1.0), "b0": ("cpu", 1.0), "b1": ("cpu", 1.0)})
    plan = plan_of(TINY_GPT, [([("a0", 1), ("a1", 2)], 5, 2), ([("b0", 2), ("b1", 1)], 3, 1)], schedule="1f1b")
    results = run_ranks(run_steps, 4, plan, pool, STEPS, CFG)
    _check_parity(results, reference(TINY_GPT, plan, STEPS, CFG), curve_atol=1e-3)
    assert {r["describe"]["schedule"] for r in results} == {"1f1b"}


@pytest.mark.slow
def test_gpipe_checkpointing_and_a_whole_model_replica_match_one_device():
    # A 2-stage GPipe replica with activation checkpointing next to a one-device replica. Ranks are
    # handed out in another order than the plan's (as multi-host rendezvous does): stage 0 of the
    # pipeline is rank 2, stage 1 rank 1.
    pool = pool_of({"a0": ("cpu", 1.0), "a1": ("cpu", 1.0), "b0": ("cpu", 1.0)})
    plan = plan_of(TINY_GPT, [([("a0", 2), ("a1", 1)], 3, 1), ([("b0", 3)], 5, 2)], schedule="gpipe",
                   checkpoint="full")
    results = run_ranks(run_steps, 3, plan, pool, 10, CFG, ["b0", "a1", "a0"])
    _check_parity(results, reference(TINY_GPT, plan, 10, CFG), curve_atol=1e-4)


def test_layout_and_reduction_sets():
    plan = plan_of(TINY_GPT, [([("a0", 1), ("a1", 2)], 5, 2), ([("b0", 2), ("b1", 1)], 3, 1)])
    roles = layout(plan)
    assert [(r.rank, r.device, r.replica, r.stage_index) for r in roles] == [
        (0, "a0", 0, 0), (1, "a1", 0, 1), (2, "b0", 1, 0), (3, "b1", 1, 1)]
    u = unit_ranks(plan)
    assert u["embed"] == (0, 2) and u["block0"] == (0, 2) and u["block1"] == (1, 2)
    assert u["block2"] == (1, 3) and u["head"] == (1, 3)


def test_plans_that_cannot_run_are_refused_before_workers_start():
    pool = pool_of({"a0": ("cpu", 1.0), "a1": ("cpu", 1.0)})
    ok = plan_of(TINY_GPT, [([("a0", 1), ("a1", 2)], 4, 2)])
    check_runnable(ok, pool, world_size=2, model=TINY_GPT)
    with pytest.raises(PlanError, match="not in pool"):
        check_runnable(plan_of(TINY_GPT, [([("a0", 1), ("zz", 2)], 4, 2)]), pool)
    with pytest.raises(PlanError, match="--nproc-per-node 2"):
        check_runnable(ok, pool, world_size=3)
    with pytest.raises(PlanError, match="re-plan for this model"):
        check_runnable(ok, pool, model=TINY_GPT.__class__(**{**TINY_GPT.to_dict(), "num_layers": 4}))
    # Stage groups run now (tensor parallel, FSDP2); one that mixes both in one group does not.
    two = Plan(model=TINY_GPT, global_batch=4, seq_len=32, replicas=(Replica(
        stages=(Stage(devices=("a0", "a1"), first_layer=0, num_layers=3),), batch_share=4, micro_batch_size=2),))
    check_runnable(two, pool)
    mixed = Plan(model=TINY_GPT, global_batch=4, seq_len=32, replicas=(Replica(
        stages=(Stage(devices=("a0", "a1"), first_layer=0, num_layers=3, tp_degree=2, shard="full"),),
        batch_share=4, micro_batch_size=2),))
    with pytest.raises(PlanError, match="tensor-parallel group with shard.*Fix:"):
        check_runnable(mixed, pool)


def _whole_model_bytes(spec, batch: int, seq_len: int) -> int:
    """What one device needs to train the whole model: state (params, grads, 2 AdamW moments)
    plus the activations saved for backward of one micro-batch."""
    from chipfuse.data import get_batch
    from chipfuse.model.build import build_full
    from chipfuse.model.gpt import loss_sum
    from chipfuse.runtime.emulate.device import MemoryMeter

    model = build_full(spec, 0)
    meter = MemoryMeter(device_name="probe", cap_bytes=None)
    meter.set_static(list(model.parameters()))
    x, y = get_batch(0, batch, seq_len)
    with meter.track():
        loss_sum(model(x), y).backward()
    return 4 * meter.static_bytes + (meter.peak_bytes - meter.static_bytes)


@pytest.mark.slow
def test_model_too_big_for_any_one_device_trains_across_two():
    from chipfuse.cluster.catalog import GiB
    from chipfuse.cluster.pool import pool_from_dict
    from chipfuse.errors import DeviceMemoryError

    need = _whole_model_bytes(TINY_GPT, 2, 32)
    cap_gib = 0.75 * need / GiB  # no device can hold the whole model, each holds a stage
    pool = pool_from_dict({"name": "capped", "node": [{"name": "h", "device": [
        {"name": "fast", "chip": "cpu", "emulate": {"speed": 1.0, "memory_gib": cap_gib}},
        {"name": "slow", "chip": "cpu", "emulate": {"speed": 0.5, "memory_gib": cap_gib}}]}]})
    cfg = WorkerConfig(pace=False, lr=3e-3)
    alone = plan_of(TINY_GPT, [([("fast", 3)], 2, 2)])
    with pytest.raises(DeviceMemoryError, match="'fast' \\(emulated\\) is out of memory"):
        run_steps(0, 1, alone, pool.subset(["fast"]), 2, cfg)
    split = plan_of(TINY_GPT, [([("fast", 2), ("slow", 1)], 2, 2)])
    results = run_ranks(run_steps, 2, split, pool, 3, cfg)
    ref = reference(TINY_GPT, split, 3, cfg)
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
