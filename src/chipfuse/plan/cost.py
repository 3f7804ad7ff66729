"""The cost model: predicted step time, throughput, MFU and memory per device of a Plan, with its breakdown.

Stage timing (per micro-batch, tokens = ceil(mbs / d) x seq_len on each device):
  block forward  = tokens x block FLOPs / t / (sustained FLOP/s x tokens / (tokens + 128)) + launch,
                   or the profile's measured block time; backward = 2 x forward; full checkpointing
                   adds a forward, selective (every other block
                   checkpointed, as the runtime does it) half a forward.
  frozen units (plan.freeze): a frozen block's backward skips its weight gradients
                   (model.costs.ModelCosts.frozen_backward_fraction); optimizer and in-group sync scale
                   with the stage's trainable parameters, the gradient sync sends only those.
  tensor parallel: 2 ring all-reduces of tokens x h activations per block forward, 2 backward.
  sharding (ZeRO-3): an all-gather of the block's weights in forward and backward and a reduce-scatter
                   of its gradients, overlapped with compute (the slower of the two counts).
Replica (pipeline of p stages, m micro-batches, forward f_i, backward b_i, boundary transfer c_i):
  T = sum_i (f_i + b_i) + 2 sum_i c_i + (m - 1) x max_i max(f_i + b_i, c_i, (f_i + b_i + f_i+1 + b_i+1) / 2 + c_i)
  (equal stages, no transfers: bubble fraction (p - 1) / (m + p - 1)). Stage i's last backward ends at
  T - sum_{j<i} (b_j + c_j).
Gradient sync (chipfuse.plan.gradsync), per run of layers held by the same stage groups (a segment),
  hierarchical: a ring inside each node among the groups there, then a ring across nodes over the
  slowest link among them. It starts when every holder is ready (overlap: during the holder's last
  backward), then the optimizer.
Step time = the latest stage to finish its sync and optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from chipfuse.cluster.pool import Pool
from chipfuse.model.converters import frozen_units
from chipfuse.model.costs import DTYPE_BYTES, ModelCosts, model_costs
from chipfuse.plan.gradsync import Segment, stage_finish_times, sync_segments
from chipfuse.plan.hardware import (
    BLOCK_LAUNCH_S,
    CPU_ADAM_PARAMS_S,
    HOST_LINK_BW,
    TOKENS_HALF,
    GroupHW,
    PoolIndex,
    half_ring_s,
    p2p_s,
    ring_allreduce_s,
)
from chipfuse.plan.kernels import block_kernels
from chipfuse.plan.memory import (
    StageShape,
    stage_memory,
    stage_params,
    state_bytes,
    usable_bytes,
)
from chipfuse.plan.plan import Plan
from chipfuse.plan.profile import Profile, gemm_scale
from chipfuse.plan.tables import ReplicaTable, StageTable


@dataclass(frozen=True, kw_only=True)
class BlockTime:
    """Seconds of one stage shape, split into what grows with its block count and what does not."""

    fwd_per_block_s: float
    bwd_per_block_s: float
    fwd_extra_s: float
    """Embedding/head forward on the first/last stage."""
    bwd_extra_s: float

    def fwd_s(self, n: int) -> float:
        return n * self.fwd_per_block_s + self.fwd_extra_s

    def bwd_s(self, n: int) -> float:
        return n * self.bwd_per_block_s + self.bwd_extra_s


def block_time(costs: ModelCosts, hw: GroupHW, sh: StageShape, *, dtype: str) -> BlockTime:
    t, d = sh.tp, sh.data_degree
    tokens = sh.tokens_per_device(costs.seq_len)
    rate = hw.flops * tokens / (tokens + TOKENS_HALF)
    measured = _measured(hw, tokens)
    kern = None
    if measured is not None:
        f1, b1 = measured[0] / t, measured[1] / t
    elif hw.chip is not None:  # catalog peaks through the kernel model (plan.kernels)
        kern = block_kernels(costs.spec, costs.seq_len, tokens, hw.chip, dtype=hw.dtype, tp=t)
        f1, b1 = kern.fwd_s, kern.bwd_s
    else:  # a measured sustained rate (profile)
        flops_f = tokens * costs.block_fwd_flops_per_token / t
        f1, b1 = flops_f / rate + BLOCK_LAUNCH_S, 2 * flops_f / rate + 2 * BLOCK_LAUNCH_S
    if sh.checkpoint == "full":
        b1 += f1
    elif sh.checkpoint == "selective":
        b1 += f1 / 2  # every other block re-runs its forward (runtime.parallel.memory's layer-selective mode)
    w = DTYPE_BYTES[dtype]
    if t > 1:
        ar = ring_allreduce_s(tokens * costs.spec.dim * w, t, hw.intra_bw, hw.intra_lat)
        f1 += 2 * ar
        b1 += (4 if sh.checkpoint == "full" else 2) * ar
    block_bytes = costs.block_params / t * w
    if d > 1 and sh.shard in ("grads", "full"):
        gather = half_ring_s(block_bytes, d, hw.intra_bw, hw.intra_lat)
        if sh.shard == "full":
            f1 = max(f1, gather)
            b1 = max(b1, 2 * gather)
        else:
            b1 = max(b1, gather)
    if sh.offload == "params":
        upload = block_bytes / HOST_LINK_BW
        f1, b1 = max(f1, upload), max(b1, upload)
    if not sh.is_last:
        head_f = head_b = 0.0
    elif kern is not None:
        head_f, head_b = kern.head_fwd_s, kern.head_bwd_s
    else:
        head_f = tokens * costs.head_fwd_flops_per_token / t / rate
        head_b = 2 * head_f
    return BlockTime(fwd_per_block_s=f1, bwd_per_block_s=b1, fwd_extra_s=head_f, bwd_extra_s=head_b)


def _measured(hw: GroupHW, tokens: int) -> tuple[float, float] | None:
    if not hw.layer_times:
        return None
    best = min(hw.layer_times, key=lambda x: abs(x.micro_batch_size * x.seq_len - tokens))
    scale = gemm_scale(hw.gemm_curve, best.micro_batch_size * best.seq_len, tokens)
    return best.fwd_s * scale, best.bwd_s * scale


def optimizer_s(costs: ModelCosts, hw: GroupHW, sh: StageShape, *, dtype: str, optimizer_dtype: str) -> float:
    """Adam is memory-bound: every byte of state read and written once; offloaded, it runs on the host."""
    sb = state_bytes(dtype, optimizer_dtype)
    params = stage_params(costs, sh.num_layers, is_first=sh.is_first, is_last=sh.is_last) / sh.tp
    if sh.shard != "none":
        params /= sh.data_degree
    if sh.offload != "none":
        return params * (sb.grads + sb.weights) / HOST_LINK_BW + params / CPU_ADAM_PARAMS_S
    return 2 * params * sb.total / hw.mem_bw


def group_sync_s(costs: ModelCosts, hw: GroupHW, sh: StageShape, *, dtype: str) -> float:
    """Once per step inside a group with d > 1 data ranks (sharded modes reduce per micro-batch instead)."""
    d = sh.data_degree
    if d <= 1 or sh.shard == "full":
        return 0.0
    params = stage_params(costs, sh.num_layers, is_first=sh.is_first, is_last=sh.is_last) / sh.tp
    nbytes = params * DTYPE_BYTES[dtype]
    if sh.shard == "grads":
        return half_ring_s(nbytes, d, hw.intra_bw, hw.intra_lat)
    return ring_allreduce_s(nbytes, d, hw.intra_bw, hw.intra_lat)


def pipeline_s(fwd: list[float], bwd: list[float], p2p: list[float], m: int) -> float:
    """Closed form of a pipeline of unequal stages (see the module docstring)."""
    if m <= 0:
        return 0.0
    per = [f + b for f, b in zip(fwd, bwd, strict=True)]
    # Two neighbours exchange a micro-batch each way per period: with transfers on the critical
    # path, their mean plus one round of transfer bounds the period too (matches the simulator).
    pairs = [(per[i] + per[i + 1]) / 2 + p2p[i] for i in range(len(per) - 1)]
    steady = max(max(per), max(p2p, default=0.0), max(pairs, default=0.0))
    return sum(per) + 2 * sum(p2p) + (m - 1) * steady


def in_flight(schedule: str, p: int, i: int, m: int) -> int:
    return m if schedule == "gpipe" else max(1, min(m, p - i))


# ---------------------------------------------------------------------------------------------- plan tables
def plan_tables(plan: Plan, pool: Pool, profile: Profile | None = None, *, index: PoolIndex | None = None,
                costs: ModelCosts | None = None) -> list[ReplicaTable]:
    """Per replica and stage: the cost tables that both predict() and the simulator use."""
    costs = costs or model_costs(plan.model, plan.seq_len)
    ix = index or PoolIndex(pool, profile, plan.dtype)
    cache: dict[tuple, tuple] = {}
    out = []
    frozen = frozen_units(plan)
    for ri, r in enumerate(plan.replicas):
        p, m = len(r.stages), r.num_micro_batches
        rows = []
        for i, st in enumerate(r.stages):
            hw = ix.hw(st.devices)
            sh = StageShape(num_layers=st.num_layers, is_first=i == 0, is_last=i == p - 1, group_size=len(st.devices),
                            tp=st.tp_degree, checkpoint=st.checkpoint, shard=st.shard, offload=st.offload,
                            micro_batch_size=r.micro_batch_size, in_flight=in_flight(plan.schedule, p, i, m),
                            micro_batches=m)
            key = (hw, sh)
            if key not in cache:
                bt = block_time(costs, hw, sh, dtype=plan.dtype)
                cache[key] = (bt.fwd_s(sh.num_layers), bt.bwd_s(sh.num_layers),
                              optimizer_s(costs, hw, sh, dtype=plan.dtype, optimizer_dtype=plan.optimizer_dtype),
                              group_sync_s(costs, hw, sh, dtype=plan.dtype),
                              stage_memory(costs, sh, dtype=hw.dtype, optimizer_dtype=plan.optimizer_dtype))
            f, b, o, g, mem = cache[key]
            if frozen:
                b, o, g = _frozen_priced(costs, st, sh, frozen, b, o, g)
            c = 0.0
            if i < p - 1:
                a_node, b_node = ix.dev[st.devices[0]].node, ix.dev[r.stages[i + 1].devices[0]].node
                nbytes = sh.tokens_per_device(costs.seq_len) * sh.data_degree * costs.spec.dim * DTYPE_BYTES[plan.dtype]
                bw, lat = ix.link(a_node, b_node, nbytes)  # a size-dependent link at this message size
                c = p2p_s(nbytes, bw, lat)
            rows.append(StageTable(replica=ri, index=i, devices=st.devices,
                                   nodes=frozenset(ix.dev[dv].node for dv in st.devices), hw=hw, shape=sh,
                                   fwd_s=f, bwd_s=b, p2p_s=c, opt_s=o, group_sync_s=g, memory=mem))
        T = pipeline_s([s.fwd_s for s in rows], [s.bwd_s for s in rows], [s.p2p_s for s in rows], m)
        out.append(ReplicaTable(stages=tuple(rows), num_micro_batches=m, pipeline_s=T))
    return out


def _frozen_priced(costs: ModelCosts, st: Any, sh: StageShape, frozen: frozenset[str], bwd_s: float, opt_s: float,
                   sync_s: float) -> tuple[float, float, float]:
    """A stage's backward, optimizer and in-group sync times with some of its units frozen: each frozen
    block's backward skips its weight gradients (ModelCosts.frozen_backward_fraction; the head and the
    embedding are priced like blocks, a small term), and the optimizer and the group's gradient
    traffic scale with the trainable share of the stage's parameters."""
    n_frozen = sum(f"block{i}" in frozen for i in st.layers)
    bwd_s *= 1 - costs.frozen_backward_fraction * n_frozen / st.num_layers
    total = stage_params(costs, st.num_layers, is_first=sh.is_first, is_last=sh.is_last)
    share = costs.trainable_params(st.layers, first=sh.is_first, last=sh.is_last, frozen=frozen) / total
    return bwd_s, opt_s * share, sync_s * share


def memory_per_device(plan: Plan, pool: Pool) -> dict[str, int]:
    """Bytes each device of the plan holds at its peak (chipfuse.plan.memory), without timing anything."""
    costs = model_costs(plan.model, plan.seq_len)
    out: dict[str, int] = {}
    for r in plan.replicas:
        p, m = len(r.stages), r.num_micro_batches
        for i, st in enumerate(r.stages):
            sh = StageShape(num_layers=st.num_layers, is_first=i == 0, is_last=i == p - 1, group_size=len(st.devices),
                            tp=st.tp_degree, checkpoint=st.checkpoint, shard=st.shard, offload=st.offload,
                            micro_batch_size=r.micro_batch_size, in_flight=in_flight(plan.schedule, p, i, m),
                            micro_batches=m)
            total = stage_memory(costs, sh, dtype=plan.dtype, optimizer_dtype=plan.optimizer_dtype).total
            out.update({d: total for d in st.devices})
    return out


# ---------------------------------------------------------------------------------------------- predict
@dataclass(frozen=True, kw_only=True)
class Prediction:
    step_s: float
    tokens_per_s: float
    mfu: float
    memory_bytes: dict[str, int]
    breakdown: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.breakdown.get("over_capacity")

    def to_dict(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "memory_bytes": self.memory_bytes, "fits": self.fits, "breakdown": self.breakdown}


def predict(plan: Plan, pool: Pool, profile: Profile | None = None, *, overlap: bool = True,
            index: PoolIndex | None = None) -> Prediction:
    """Predict one training step of `plan` on `pool` (catalog x efficiency, or `profile` where measured).

    Raises PlanError when the plan names devices the pool does not have. Islands in `plan.sync`
    (DiLoCo) are not modelled yet: every replica is predicted to all-reduce every step.
    """
    plan.check_against_pool(pool)
    costs = model_costs(plan.model, plan.seq_len)
    ix = index or PoolIndex(pool, profile, plan.dtype)
    tables = plan_tables(plan, pool, profile, index=ix, costs=costs)
    segs = sync_segments(plan, tables, ix, costs)
    fin = stage_finish_times(tables, segs, overlap=overlap)
    return _prediction(plan, ix, costs, tables, segs, fin)


def _prediction(plan: Plan, ix: PoolIndex, costs: ModelCosts, tables: list[ReplicaTable], segs: list[Segment],
                fin: dict[tuple[int, int], dict[str, float]]) -> Prediction:
    step = max(v["finish_s"] for v in fin.values())
    tokens = plan.global_batch * plan.seq_len
    memory: dict[str, int] = {}
    over: dict[str, int] = {}
    peak = 0.0
    for r in tables:
        for s in r.stages:
            for dv in s.devices:
                memory[dv] = s.memory.total
                cap = usable_bytes(ix.dev[dv], ix.profile.runtime_bytes.get(dv) if ix.profile else None)
                if s.memory.total > cap:
                    over[dv] = s.memory.total - cap
                peak += ix.dev[dv].peak_flops(plan.dtype)
    mfu = costs.model_flops_per_token() * tokens / (step * peak) if step > 0 and peak else 0.0
    slowest = max(range(len(tables)), key=lambda i: tables[i].pipeline_s)
    sl = tables[slowest]
    busy = sl.num_micro_batches * max(s.fwd_s + s.bwd_s for s in sl.stages)
    breakdown: dict[str, Any] = {
        "pipeline_s": sl.pipeline_s,
        "slowest_replica": slowest,
        "bubble_fraction": 1 - busy / sl.pipeline_s if sl.pipeline_s else 0.0,
        "compute_s": busy,
        "sync_exposed_s": step - max(r.pipeline_s for r in tables),
        "num_sync_segments": len(segs),
        "model_flops_per_step": costs.model_flops_per_token() * tokens,
        "peak_flops": peak,
        "over_capacity": over,
        "replicas": [
            {"micro_batches": r.num_micro_batches, "pipeline_s": r.pipeline_s,
             "stages": [{"devices": list(s.devices), "fwd_s": s.fwd_s, "bwd_s": s.bwd_s, "p2p_s": s.p2p_s,
                         "opt_s": s.opt_s, "sync_s": fin[(s.replica, s.index)]["sync_s"],
                         "finish_s": fin[(s.replica, s.index)]["finish_s"], "memory": s.memory.to_dict()}
                        for s in r.stages]}
            for r in tables
        ],
    }
    return Prediction(step_s=step, tokens_per_s=tokens / step if step > 0 else math.inf, mfu=mfu,
                      memory_bytes=memory, breakdown=breakdown)


__all__ = ["Prediction", "predict", "memory_per_device", "plan_tables", "pipeline_s", "block_time", "Segment",
           "sync_segments", "stage_finish_times"]
