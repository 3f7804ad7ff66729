"""The plan for the survivors of a lost device: the same kind of plan, on the devices left.

A data-parallel plan keeps its surviving replicas, with the global batch shared among them in
proportion to the shares they had (runtime/launch/supervisor.py, `survivor_plan`). Any other plan
is searched again over the survivors by the planner itself (plan/search.py), restricted to the
old plan's kind: a pipeline stays a pipeline, one-stage sharded groups stay one-stage, and memory is
priced by the one memory model the planner searches with (plan/memory.py). The model, global batch,
sequence length, dtypes, schedule and frozen units are kept: the samples of a step depend on them, and the
checkpoint the survivors resume from was written for them."""

from __future__ import annotations

from dataclasses import replace

from chipfuse.cluster.pool import Pool
from chipfuse.plan.plan import Plan

SEARCH_BUDGET_S = 2.0
"""The survivors wait for this search; a lost device is rare and the first plan found is close."""


def is_pipeline(plan: Plan) -> bool:
    return any(len(r.stages) > 1 for r in plan.replicas)


def replan_survivors(plan: Plan, pool: Pool, dead: set[str]) -> Plan:
    """`plan` re-made over its devices minus `dead`, of the same kind. Raises PlanError (with the fix)
    when no plan of that kind fits the survivors."""
    from chipfuse.runtime.launch.supervisor import survivor_plan

    if plan.is_pure_data_parallel:
        return survivor_plan(plan, dead)
    return same_kind_plan(plan, pool.subset([d for d in plan.devices if d not in dead]))


def same_kind_plan(plan: Plan, pool: Pool) -> Plan:
    """A plan like `plan` (pipeline or not; model, batch, sequence, dtypes and schedule kept) over
    the devices of `pool`, found by the planner's search; the devices `plan` had that `pool` lacks
    are listed as excluded. One device left cannot hold a pipeline: it gets the whole model."""
    from chipfuse.plan.search import search

    found = search(pool, plan.model, global_batch=plan.global_batch, seq_len=plan.seq_len,
                   time_budget_s=SEARCH_BUDGET_S, dtype=plan.dtype, optimizer_dtype=plan.optimizer_dtype,
                   schedule=plan.schedule, pipeline=is_pipeline(plan) and len(pool.devices) > 1).plan
    here = {d.name for d in pool.devices}
    gone = sorted(d for d in plan.devices if d not in here)
    excluded = tuple(dict.fromkeys([*plan.excluded, *gone, *found.excluded]))
    return replace(found, strategy=plan.strategy, excluded=excluded, freeze=plan.freeze)
