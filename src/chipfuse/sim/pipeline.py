"""Replay one training step of a plan, event by event, on the cost model's own tables.

Each replica's stages run their schedule's operations in order (GPipe: every forward, then every
backward; 1F1B: p - i - 1 warm-up forwards on stage i, then one forward and one backward in turn,
then the remaining backwards). A forward waits for the previous stage's forward of the same
micro-batch plus the activation transfer; a backward for the next stage's backward plus the gradient
transfer. Each link direction carries one transfer at a time. Then every stage reduces its gradients
with the other holders of its layers (chipfuse.plan.cost.stage_finish_times: overlapped with the last
backward or not) and steps its optimizer. Written by hand: it is the planner's own model of a step,
not a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.cluster.pool import Pool
from chipfuse.model.costs import model_costs
from chipfuse.plan.cost import plan_tables, stage_finish_times, sync_segments
from chipfuse.plan.hardware import PoolIndex
from chipfuse.plan.plan import Plan
from chipfuse.plan.profile import Profile
from chipfuse.plan.tables import ReplicaTable


@dataclass(frozen=True, kw_only=True)
class Event:
    replica: int
    stage: int
    devices: tuple[str, ...]
    kind: str
    """fwd | bwd | send-act | send-grad | sync | optimizer"""
    micro_batch: int
    start_s: float
    end_s: float


@dataclass(frozen=True, kw_only=True)
class SimResult:
    step_s: float
    events: tuple[Event, ...]
    replica_s: tuple[float, ...]
    """When each replica's last backward ends."""

    def busy_s(self, devices: tuple[str, ...]) -> float:
        return sum(e.end_s - e.start_s for e in self.events if e.devices == devices and e.kind in ("fwd", "bwd"))

    def timeline(self) -> dict[str, list[dict]]:
        """Per device: its events as plain dicts (for JSON)."""
        out: dict[str, list[dict]] = {}
        for e in self.events:
            for d in e.devices:
                out.setdefault(d, []).append({"kind": e.kind, "micro_batch": e.micro_batch,
                                              "start_s": e.start_s, "end_s": e.end_s})
        return out


def stage_order(schedule: str, p: int, i: int, m: int) -> list[tuple[str, int]]:
    """The operations stage i of p runs, in order, for m micro-batches."""
    if schedule == "gpipe":
        return [("fwd", j) for j in range(m)] + [("bwd", j) for j in range(m)]
    warm = min(p - i - 1, m)
    ops = [("fwd", j) for j in range(warm)]
    for j in range(m - warm):
        ops += [("fwd", warm + j), ("bwd", j)]
    return ops + [("bwd", j) for j in range(m - warm, m)]


def replay_replica(table: ReplicaTable, schedule: str) -> list[tuple[int, str, int, float, float]]:
    """(stage, kind, micro-batch, start, end) of every compute and transfer operation of one replica."""
    st = table.stages
    p, m = len(st), table.num_micro_batches
    orders = [stage_order(schedule, p, i, m) for i in range(p)]
    pos = [0] * p
    free = [0.0] * p
    link_fwd = [0.0] * p  # link i -> i+1
    link_bwd = [0.0] * p  # link i+1 -> i
    arrive_act: dict[tuple[int, int], float] = {}
    arrive_grad: dict[tuple[int, int], float] = {}
    out = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            while pos[i] < len(orders[i]):
                kind, j = orders[i][pos[i]]
                if kind == "fwd":
                    dep = 0.0 if i == 0 else arrive_act.get((i, j))
                else:
                    dep = arrive_grad.get((i, j)) if i < p - 1 else 0.0
                if dep is None:
                    break
                start = max(free[i], dep)
                end = start + (st[i].fwd_s if kind == "fwd" else st[i].bwd_s)
                free[i] = end
                out.append((i, kind, j, start, end))
                if kind == "fwd" and i < p - 1:
                    s0 = max(end, link_fwd[i])
                    link_fwd[i] = s0 + st[i].p2p_s
                    arrive_act[(i + 1, j)] = link_fwd[i]
                    out.append((i, "send-act", j, s0, link_fwd[i]))
                elif kind == "bwd" and i > 0:
                    s0 = max(end, link_bwd[i - 1])
                    link_bwd[i - 1] = s0 + st[i - 1].p2p_s
                    arrive_grad[(i - 1, j)] = link_bwd[i - 1]
                    out.append((i, "send-grad", j, s0, link_bwd[i - 1]))
                pos[i] += 1
                remaining -= 1
                progressed = True
        assert progressed, "schedule deadlocked"  # our own invariant: orders above never deadlock
    return out


def simulate(plan: Plan, pool: Pool, profile: Profile | None = None, *, overlap: bool = True) -> SimResult:
    """Replay one step of `plan` (identical replicas are replayed once)."""
    costs = model_costs(plan.model, plan.seq_len)
    ix = PoolIndex(pool, profile, plan.dtype)
    tables = plan_tables(plan, pool, profile, index=ix, costs=costs)
    segs = sync_segments(plan, tables, ix, costs)
    memo: dict[tuple, list] = {}
    events: list[Event] = []
    ends: dict[tuple[int, int], float] = {}
    replica_s = []
    for ri, t in enumerate(tables):
        key = (t.num_micro_batches, tuple((s.fwd_s, s.bwd_s, s.p2p_s) for s in t.stages))
        if key not in memo:
            memo[key] = replay_replica(t, plan.schedule)
        ops = memo[key]
        last = 0.0
        for i, kind, j, a, b in ops:
            events.append(Event(replica=ri, stage=i, devices=t.stages[i].devices, kind=kind, micro_batch=j,
                                start_s=a, end_s=b))
            if kind == "bwd":
                ends[(ri, i)] = max(ends.get((ri, i), 0.0), b)
                last = max(last, b)
        for i in range(len(t.stages)):
            ends.setdefault((ri, i), 0.0)
        replica_s.append(last)
    fin = stage_finish_times(tables, segs, overlap=overlap, end_s=ends)
    for (ri, i), f in fin.items():
        devs = tables[ri].stages[i].devices
        if f["sync_s"] > 0:
            events.append(Event(replica=ri, stage=i, devices=devs, kind="sync", micro_batch=-1,
                                start_s=f["sync_done_s"] - f["sync_s"], end_s=f["sync_done_s"]))
        events.append(Event(replica=ri, stage=i, devices=devs, kind="optimizer", micro_batch=-1,
                            start_s=f["sync_done_s"], end_s=f["finish_s"]))
    step = max(f["finish_s"] for f in fin.values())
    return SimResult(step_s=step, events=tuple(events), replica_s=tuple(replica_s))
