"""Gradient sync between replicas: which stage groups reduce which layers, over which links, and when.

Replicas may split the layers differently, so the unit of reduction is a *segment*: a run of layers
held by the same stage groups. Each segment is one hierarchical all-reduce (a ring inside each node
among the holder groups there, then a ring across the nodes over the slowest link among them). A
segment starts when every holder is ready (with overlap: when its last backward starts), a stage
reduces its segments one after another, then steps its optimizer. DiLoCo islands (Plan.sync) would
change which holders share a segment and how often the cross-island one runs: this is the place.
Only trainable parameters are reduced: a frozen unit (plan.freeze) adds no bytes to its segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.model.converters import frozen_units
from chipfuse.model.costs import DTYPE_BYTES, ModelCosts
from chipfuse.plan.hardware import PoolIndex, ring_allreduce_s
from chipfuse.plan.islands import island_sync_s
from chipfuse.plan.plan import Plan
from chipfuse.plan.tables import ReplicaTable


@dataclass(frozen=True, kw_only=True)
class Segment:
    """A run of layers [first, last) that the same stage groups hold: one gradient all-reduce."""

    first: int
    last: int
    holders: tuple[tuple[int, int], ...]
    """(replica, stage) of every holder."""
    sync_s: float


def sync_segments(plan: Plan, tables: list[ReplicaTable], index: PoolIndex, costs: ModelCosts) -> list[Segment]:
    L = plan.model.num_layers
    cuts = sorted({0, L} | {s.first_layer for r in plan.replicas for s in r.stages})
    g_b = DTYPE_BYTES[plan.dtype]
    frozen = frozen_units(plan)
    holders_of: dict[int, list[tuple[int, int]]] = {a: [] for a in cuts[:-1]}
    pos = {a: k for k, a in enumerate(cuts)}
    for ri, r in enumerate(plan.replicas):
        for si, s in enumerate(r.stages):
            for a in cuts[pos[s.first_layer]:pos[s.first_layer + s.num_layers]]:
                holders_of[a].append((ri, si))
    # Segments crossing nodes reduce at about the same time (each in its holders' last backward):
    # those leaving one node share its NIC when the node names one (cluster.wiring).
    crossing: dict[str, int] = {}
    for a in cuts[:-1]:
        nodes = {n for ri, si in holders_of[a] for n in tables[ri].stages[si].nodes}
        if len(nodes) > 1:
            for n in nodes:
                crossing[n] = crossing.get(n, 0) + 1
    segs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        hs = holders_of[a]
        params = costs.trainable_params(range(a, b), first=a == 0, last=b == L, frozen=frozen)  # frozen: no bytes
        nbytes = params * g_b
        per_node: dict[str, int] = {}
        min_tp = min(tables[ri].stages[si].shape.tp for ri, si in hs)
        for ri, si in hs:
            node = next(iter(tables[ri].stages[si].nodes))
            per_node[node] = per_node.get(node, 0) + 1
        intra = 0.0
        for node, c in per_node.items():
            bw, lat = index.link(node, node)
            intra = max(intra, ring_allreduce_s(nbytes / min_tp, c, bw, lat))
        bw, lat = index.slowest(frozenset(per_node))
        for node in per_node:
            w = index.node[node].wiring
            nic = w.nic_bw if w is not None else None
            if nic is not None and len(per_node) > 1:
                bw = min(bw, nic / crossing.get(node, 1))
        inter = ring_allreduce_s(nbytes, len(per_node), bw, lat) if len(per_node) > 1 else 0.0
        islands_s = island_sync_s(plan, index, per_node, nbytes)  # DiLoCo islands: plan/islands.py
        if islands_s is not None:
            inter = islands_s
        segs.append(Segment(first=a, last=b, holders=tuple(hs), sync_s=intra + inter))
    return segs


def stage_finish_times(tables: list[ReplicaTable], segs: list[Segment], *, overlap: bool = True,
                       end_s: dict[tuple[int, int], float] | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """When each stage finishes its step: backward end, gradient sync (waiting for all holders), optimizer.

    `end_s` overrides the backward end times (the simulator passes the ones it replayed).
    """
    ends = end_s or {(r.stages[0].replica, i): r.end_s(i) for r in tables for i in range(len(r.stages))}
    ready = {}
    for r in tables:
        for i, s in enumerate(r.stages):
            k = (s.replica, i)
            window = s.bwd_s if overlap else 0.0
            ready[k] = max(0.0, ends[k] - (window if r.num_micro_batches else 0.0)) + s.group_sync_s
    seg_start = [max(ready[h] for h in sg.holders) for sg in segs]
    by_stage: dict[tuple[int, int], list[int]] = {}
    for j, sg in enumerate(segs):
        for h in sg.holders:
            by_stage.setdefault(h, []).append(j)
    out = {}
    for r in tables:
        for i, s in enumerate(r.stages):
            k = (s.replica, i)
            t = ready[k]
            sync = 0.0
            for j in reversed(by_stage.get(k, [])):  # backward produces the last layers' gradients first
                t = max(t, seg_start[j]) + segs[j].sync_s
                sync += segs[j].sync_s
            done = max(t, ends[k]) + s.opt_s
            out[k] = {"end_bwd_s": ends[k], "sync_s": sync, "sync_done_s": max(t, ends[k]), "finish_s": done}
    return out
