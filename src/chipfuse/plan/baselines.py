"""The simple strategies, as Plans, so that every choice of the search can be compared with them.

- even: Megatron-style uniform split over every device: the fewest pipeline stages (one device
  each) with equal block counts that fit the smallest device, equal batch shares per replica.
- fastest-only: only the fastest kind of device, with the search's own best homogeneous layout.
- proportional-dp: Whale-style data parallelism, a whole model on each device, shares in proportion to
  each device's sustained FLOP/s (largest-remainder rounding).
Each takes the micro-batch size that predicts best; full checkpointing where the plain one does not fit.
"""

from __future__ import annotations

import math
from dataclasses import replace

from chipfuse.plan.balance import largest_remainder
from chipfuse.plan.context import Context, Scored
from chipfuse.plan.cost import in_flight
from chipfuse.plan.memory import StageShape, stage_memory, usable_bytes
from chipfuse.plan.plan import Plan, Replica, Stage


def baselines(ctx: Context) -> dict[str, Scored | None]:
    return {"even": even(ctx), "fastest-only": fastest_only(ctx), "proportional-dp": proportional_dp(ctx)}


def _best(ctx: Context, plans: list[Plan]) -> Scored | None:
    scored = [Scored(plan=p, prediction=ctx.predict(p)) for p in plans]
    if not scored:
        return None
    return max(scored, key=lambda s: (s.prediction.fits, s.prediction.tokens_per_s))


def _uniform_layers(L: int, p: int) -> list[int]:
    base, extra = divmod(L, p)
    return [base + (1 if i < extra else 0) for i in range(p)]


def _checkpoint_that_fits(ctx: Context, layers: list[int], mbs: int, memory: int, share: int) -> str | None:
    """`memory`: usable bytes (plan.memory.usable) of the smallest device."""
    p = len(layers)
    m = math.ceil(share / mbs)
    for ck in ("none", "full"):
        ok = True
        for i in {0, p - 1}:
            sh = StageShape(num_layers=layers[i], is_first=i == 0, is_last=i == p - 1, group_size=1,
                            checkpoint=ck, micro_batch_size=mbs, in_flight=in_flight(ctx.schedule, p, i, m),
                            micro_batches=m)
            if stage_memory(ctx.costs, sh, dtype=ctx.dtype, optimizer_dtype=ctx.optimizer_dtype).total > memory:
                ok = False
        if ok:
            return ck
    return None


def even(ctx: Context) -> Scored | None:
    devices = [d.name for d in ctx.pool.devices]
    smallest = min(usable_bytes(d) for d in ctx.pool.devices)
    L = ctx.costs.num_layers
    for p in range(1, min(L, len(devices)) + 1):
        layers = _uniform_layers(L, p)
        R = len(devices) // p
        share = math.ceil(ctx.global_batch / R)
        if _checkpoint_that_fits(ctx, layers, 1, smallest, share) is None:
            continue
        plans = []
        for mbs in ctx.micro_batch_sizes():
            ck = _checkpoint_that_fits(ctx, layers, mbs, smallest, share)
            if ck is None:
                continue
            base, extra = divmod(ctx.global_batch, R)
            replicas = []
            for r in range(R):
                first, stages = 0, []
                for i, n in enumerate(layers):
                    stages.append(Stage(devices=(devices[r * p + i],), first_layer=first, num_layers=n, checkpoint=ck))
                    first += n
                share = base + (1 if r < extra else 0)
                replicas.append(Replica(stages=tuple(stages), batch_share=share, micro_batch_size=max(1, min(mbs, share))))
            plans.append(_plan(ctx, replicas, devices[:R * p], "even"))
        return _best(ctx, plans)
    return None


def proportional_dp(ctx: Context) -> Scored | None:
    devs = list(ctx.pool.devices)
    shares = largest_remainder([ctx.ix.rate(d.name) for d in devs], ctx.global_batch)
    L = ctx.costs.num_layers
    plans = []
    for mbs in ctx.micro_batch_sizes():
        ck = _checkpoint_that_fits(ctx, [L], mbs, min(usable_bytes(d) for d in devs), max(shares)) or "full"
        replicas = [Replica(stages=(Stage(devices=(d.name,), first_layer=0, num_layers=L, checkpoint=ck),),
                            batch_share=n, micro_batch_size=max(1, min(mbs, n) if n else mbs))
                    for d, n in zip(devs, shares, strict=True)]
        plans.append(_plan(ctx, replicas, [d.name for d in devs], "proportional-dp"))
    return _best(ctx, plans)


def fastest_only(ctx: Context) -> Scored | None:
    fastest = max(range(len(ctx.kinds)), key=lambda k: ctx.kinds[k].rate)
    tpls = ctx.homogeneous(fastest, deadline=float("inf"))
    tpls.sort(key=ctx.estimate, reverse=True)
    alone = []
    for t in tpls[:3]:  # solved for a share of the batch; alone, they take all of it
        t = replace(t, m_est=math.ceil(ctx.global_batch / t.replicas / t.mbs))
        if ctx.solver.solve(t).layers:
            alone.append(t)
    return _best(ctx, [ctx.build([t], "fastest-only") for t in alone])


def _plan(ctx: Context, replicas: list[Replica], used: list[str], strategy: str) -> Plan:
    keep = set(used)
    return Plan(model=ctx.model, global_batch=ctx.global_batch, seq_len=ctx.seq_len, replicas=tuple(replicas),
                schedule=ctx.schedule, dtype=ctx.dtype, optimizer_dtype=ctx.optimizer_dtype,
                excluded=tuple(d.name for d in ctx.pool.devices if d.name not in keep), strategy=strategy,
                pool=ctx.pool.name)
