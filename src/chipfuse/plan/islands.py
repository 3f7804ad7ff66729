"""Slow links in the plan: predict gradient-sync time per step and propose DiLoCo islands and H.

Pure: a pool (nodes and links), the gradient bytes of one step and the compute time of one step
in, a SyncPlan and the predictions behind it out. No torch.distributed.

The rule:
1. Synchronous data parallel reduces hierarchically: inside each node over its own link, then
   among nodes in a ring bounded by the slowest link between them (2(k-1)/k x bytes and 2(k-1)
   latencies: plan.hardware.ring_allreduce_s, shared with the cost model and runtime.emulate.links).
   If that costs at most `max_comm_fraction` of compute, keep synchronous training (islands=()).
2. Otherwise islands are the connected components of nodes joined by links fast enough for
   synchronous training on their own (a 2-member all-reduce within the budget).
3. H is the smallest number of inner steps for which the islands' own per-step sync plus the
   cross-island all-reduce of the (compressed) pseudo-gradient, spread over H steps, stays within
   the budget; capped at `max_outer_every`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chipfuse.cluster.pool import Link, Pool
from chipfuse.errors import PlanError
from chipfuse.model.costs import DTYPE_BYTES, model_costs
from chipfuse.plan.hardware import PoolIndex, ring_allreduce_s
from chipfuse.plan.plan import Plan, SyncPlan


def ring_allreduce_wire_bytes(payload_bytes: float, members: int) -> float:
    """Bytes each member sends (and receives) in a ring all-reduce of `payload_bytes`."""
    return 2 * (members - 1) / members * payload_bytes if members > 1 else 0.0


def ring_allreduce_rounds(members: int) -> int:
    """Dependent message steps of a ring all-reduce: each pays the link latency once."""
    return 2 * (members - 1) if members > 1 else 0


# Bytes per parameter of the cross-island payload: the pseudo-gradient is a difference of fp32
# master weights, whatever the compute dtype, unless it is compressed.
OUTER_BYTES_PER_PARAM = {"none": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True, kw_only=True)
class SyncAdvice:
    """A SyncPlan and the predictions that chose it (seconds per training step)."""

    sync: SyncPlan
    compute_s: float
    sync_comm_s: float
    """Predicted gradient all-reduce time per step of synchronous data parallel."""
    island_comm_s: float
    """Predicted communication per step with `sync` (the cross-island part amortised over H)."""
    cross_link: Link | None
    """The slowest link between islands (None when the plan stays synchronous)."""
    reason: str

    @property
    def predicted_speedup(self) -> float:
        return (self.compute_s + self.sync_comm_s) / (self.compute_s + self.island_comm_s)

    def to_dict(self) -> dict:
        cl = self.cross_link
        return {"islands": [list(i) for i in self.sync.islands], "outer_every": self.sync.outer_every,
                "compression": self.sync.compression, "compute_s": self.compute_s,
                "sync_comm_s": self.sync_comm_s, "island_comm_s": self.island_comm_s,
                "predicted_speedup": self.predicted_speedup, "reason": self.reason,
                "cross_link": None if cl is None else {"bandwidth_bytes_s": cl.bandwidth, "latency_s": cl.latency_s}}


def _nodes_of(pool: Pool, devices: Sequence[str]) -> list[str]:
    out: list[str] = []
    for d in devices:
        n = pool.device(d).node
        if n not in out:
            out.append(n)
    return out


def slowest_link(pool: Pool, nodes_a: Sequence[str], nodes_b: Sequence[str]) -> Link:
    """The weakest link between two sets of nodes: least bandwidth, then most latency."""
    links = [pool.link(a, b) for a in nodes_a for b in nodes_b if a != b]
    return min(links, key=lambda ln: (ln.bandwidth, -ln.latency_s))


def _hierarchical_s(pool: Pool, nodes: Sequence[str], devices: Sequence[str], payload_bytes: float) -> float:
    """All-reduce inside each node, then among nodes over the slowest link between them."""
    intra = 0.0
    for n in nodes:
        k = sum(1 for d in devices if pool.device(d).node == n)
        ln = pool.link(n, n)
        intra = max(intra, ring_allreduce_s(payload_bytes, k, ln.bandwidth, ln.latency_s))
    if len(nodes) < 2:
        return intra
    ln = slowest_link(pool, nodes, nodes)
    return intra + ring_allreduce_s(payload_bytes, len(nodes), ln.bandwidth, ln.latency_s)


def sync_comm_s(pool: Pool, devices: Sequence[str], grad_bytes: float) -> float:
    """Predicted gradient all-reduce seconds per step of synchronous data parallel over `devices`."""
    return _hierarchical_s(pool, _nodes_of(pool, devices), devices, grad_bytes)


def propose_sync(pool: Pool, devices: Sequence[str], *, grad_bytes: float, compute_s: float,
                 num_params: float | None = None,
                 max_comm_fraction: float = 0.1, max_outer_every: int = 64, compression: str = "bf16",
                 outer_lr: float = 0.7, outer_momentum: float = 0.5) -> SyncAdvice:
    """Keep synchronous training when the links allow it, else propose islands and H (see module doc).

    Outer momentum 0.5, not the DiLoCo paper's 0.9: that was tuned for hundreds of outer rounds; in
    benchmarks/slow_link.py (16 rounds) 0.9 ended 7.5% above synchronous training, 0.5 within 0.3%."""
    budget_s = max_comm_fraction * compute_s
    nodes = _nodes_of(pool, devices)
    sync_s = _hierarchical_s(pool, nodes, devices, grad_bytes)
    if sync_s <= budget_s:
        return SyncAdvice(sync=SyncPlan(), compute_s=compute_s, sync_comm_s=sync_s, island_comm_s=sync_s,
                          cross_link=None, reason=f"synchronous: {sync_s * 1e3:.1f} ms of sync per step is within "
                          f"{max_comm_fraction:.0%} of {compute_s * 1e3:.1f} ms compute")
    # Components of nodes joined by links that could carry synchronous training on their own.
    parent = {n: n for n in nodes}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ln = pool.link(a, b)
            if ring_allreduce_s(grad_bytes, 2, ln.bandwidth, ln.latency_s) <= budget_s:
                parent[root(b)] = root(a)
    comps: dict[str, list[str]] = {}
    for n in nodes:
        comps.setdefault(root(n), []).append(n)
    node_groups = list(comps.values())
    if len(node_groups) < 2:
        return SyncAdvice(sync=SyncPlan(), compute_s=compute_s, sync_comm_s=sync_s, island_comm_s=sync_s,
                          cross_link=None, reason="synchronous: no single slow link to split on "
                          "(every link is fast alone; the ring over all nodes is what costs)")
    islands = tuple(tuple(d for d in devices if pool.device(d).node in g) for g in node_groups)
    inner_s = max(_hierarchical_s(pool, g, isl, grad_bytes) for g, isl in zip(node_groups, islands, strict=True))
    cross = min((slowest_link(pool, a, b) for i, a in enumerate(node_groups) for b in node_groups[i + 1:]),
                key=lambda ln: (ln.bandwidth, -ln.latency_s))
    params = num_params if num_params is not None else grad_bytes / 4  # fp32 gradients by default
    outer_s = ring_allreduce_s(params * OUTER_BYTES_PER_PARAM[compression], len(islands), cross.bandwidth,
                               cross.latency_s)
    room_s = budget_s - inner_s
    h = max_outer_every if room_s <= 0 else min(max_outer_every, max(1, math.ceil(outer_s / room_s)))
    sync = SyncPlan(islands=islands, outer_every=h, outer_lr=outer_lr, outer_momentum=outer_momentum,
                    compression=compression)
    return SyncAdvice(sync=sync, compute_s=compute_s, sync_comm_s=sync_s, island_comm_s=inner_s + outer_s / h,
                      cross_link=cross,
                      reason=f"islands: sync would cost {sync_s * 1e3:.0f} ms per {compute_s * 1e3:.0f} ms step; "
                      f"H={h} spreads a {outer_s * 1e3:.0f} ms cross-island all-reduce")


def island_sync_s(plan: Plan, index: PoolIndex, nodes: Iterable[str], nbytes: float) -> float | None:
    """Per-step seconds to reduce `nbytes` across `nodes` under plan.sync's islands: a ring among
    each island's nodes every step, and the cross-island ring of the compressed pseudo-gradient
    once every H steps. None when the plan has no islands (the cost model's own ring applies)."""
    if not plan.sync.islands:
        return None
    island_of = {index.pool.device(d).node: k for k, isl in enumerate(plan.sync.islands) for d in isl}
    groups: dict[int, list[str]] = {}
    for n in nodes:
        groups.setdefault(island_of.get(n, -1), []).append(n)
    inner = max(ring_allreduce_s(nbytes, len(g), *index.slowest(frozenset(g))) for g in groups.values())
    if len(groups) < 2:
        return inner
    bw, lat = index.slowest(frozenset(n for g in groups.values() for n in g))
    params = nbytes / DTYPE_BYTES[plan.dtype]
    cross = ring_allreduce_s(params * OUTER_BYTES_PER_PARAM[plan.sync.compression], len(groups), bw, lat)
    return inner + cross / plan.sync.outer_every


def island_layout(plan: Plan) -> tuple[tuple[str, ...], ...]:
    """The plan's islands as device names (no islands: one island of every device), checked."""
    devices = list(plan.devices)
    islands = plan.sync.islands or (tuple(devices),)
    named = [d for isl in islands for d in isl]
    if sorted(named) != sorted(devices):
        raise PlanError(f"sync.islands name {sorted(named)}, the plan's devices are {sorted(devices)}. "
                        "Fix: put every device of the plan in exactly one island")
    return tuple(tuple(i) for i in islands)


def advise_sync(plan: Plan, pool: Pool, *, compute_s: float, max_comm_fraction: float = 0.1) -> SyncAdvice:
    """propose_sync for a searched plan: its devices, its model's gradient bytes, its compute time.

    Islands hold whole replicas of one-device stages (one device, or a pipeline), which is what the
    trainer runs with islands: other plans stay synchronous and the reason says so."""
    # Gradients travel in the compute dtype, as the cost model assumes for synchronous plans.
    num_params = model_costs(plan.model, plan.seq_len).total_params
    adv = propose_sync(pool, plan.devices, grad_bytes=num_params * DTYPE_BYTES[plan.dtype], compute_s=compute_s,
                       num_params=num_params, max_comm_fraction=max_comm_fraction)
    why = islands_refusal(plan, adv.sync.islands) if adv.sync.islands else None
    if why:
        return SyncAdvice(sync=SyncPlan(), compute_s=compute_s, sync_comm_s=adv.sync_comm_s,
                          island_comm_s=adv.sync_comm_s, cross_link=None, reason=f"synchronous: {why}")
    return adv


def islands_refusal(plan: Plan, islands: Sequence[Sequence[str]]) -> str | None:
    """Why `plan` cannot run with these islands, with the fix; None when it can. Islands hold whole
    replicas of one-device stages: one device, or a pipeline inside the island (the one rule for the
    planner's advice and the runtime's check)."""
    island_of = {d: k for k, isl in enumerate(islands) for d in isl}
    for i, r in enumerate(plan.replicas):
        if any(len(s.devices) > 1 for s in r.stages):
            return (f"replicas[{i}] has a stage group of several devices (tensor parallel or sharded); islands run "
                    "replicas of one-device stages. Fix: drop sync.islands, or give that replica one device per stage")
        spans = sorted({island_of[d] for d in r.devices})
        if len(spans) > 1:
            return (f"replicas[{i}] ({', '.join(r.devices)}) spans islands {spans}: a pipeline's stages talk every "
                    "micro-batch and belong in one island. Fix: put all of its devices in one island, or split it")
    return None
