"""The cost tables of a plan: per replica and stage, what one micro-batch costs where.

plan.cost fills them (`plan_tables`); the cost model's prediction, the gradient-sync timing
(plan.gradsync) and the simulator (sim/) read them. Plain data, so each reader imports this module
and none imports another's."""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.plan.hardware import GroupHW
from chipfuse.plan.memory import StageMemory, StageShape


@dataclass(frozen=True, kw_only=True)
class StageTable:
    replica: int
    index: int
    devices: tuple[str, ...]
    nodes: frozenset[str]
    hw: GroupHW
    shape: StageShape
    fwd_s: float
    bwd_s: float
    p2p_s: float
    """Transfer of one micro-batch's activations to the next stage (0 on the last)."""
    opt_s: float
    group_sync_s: float
    memory: StageMemory


@dataclass(frozen=True, kw_only=True)
class ReplicaTable:
    stages: tuple[StageTable, ...]
    num_micro_batches: int
    pipeline_s: float

    def end_s(self, i: int) -> float:
        """When stage i's last backward ends."""
        return self.pipeline_s - sum(s.bwd_s + s.p2p_s for s in self.stages[:i])
