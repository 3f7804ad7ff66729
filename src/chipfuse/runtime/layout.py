"""Which rank does what under a plan, and whether this runtime can run the plan at all.

Pure functions of (plan, pool): no torch.distributed here, so a plan that cannot run is refused
before any worker starts. Ranks follow plan.devices order: replica by replica, stage by stage,
so the ranks of one pipeline are consecutive and in stage order (their order inside the
pipeline's process group, which torch.distributed.pipelining maps to stage indices).
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.errors import PlanError
from chipfuse.model.spec import FAMILIES, ModelSpec
from chipfuse.plan.plan import Plan
from chipfuse.runtime.stages import EMBED_UNIT, HEAD_UNIT, TIED_UNIT, block_unit, has_tied_unit


@dataclass(frozen=True, kw_only=True)
class Role:
    rank: int
    device: str
    replica: int
    stage_index: int
    num_stages: int
    pipeline_ranks: tuple[int, ...]
    """Ranks of this replica's pipeline, in stage order."""

    @property
    def first(self) -> bool:
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        return self.stage_index == self.num_stages - 1


def layout(plan: Plan, by_rank: list[str] | None = None) -> list[Role]:
    """Every rank's role, in rank order. by_rank: the device of each rank when the launcher chose
    (multi-host c10d hands out ranks by arrival); default plan.devices order, which keeps each
    pipeline's ranks consecutive and in stage order."""
    names = list(by_rank) if by_rank is not None else list(plan.devices)
    rank_of = {d: i for i, d in enumerate(names)}
    roles: list[Role] = []
    for i, rep in enumerate(plan.replicas):
        ranks = tuple(rank_of[s.devices[0]] for s in rep.stages)
        for j, st in enumerate(rep.stages):
            roles.append(Role(rank=rank_of[st.devices[0]], device=st.devices[0], replica=i, stage_index=j,
                              num_stages=len(rep.stages), pipeline_ranks=ranks))
    return sorted(roles, key=lambda r: r.rank)


def units_of_model(spec: ModelSpec) -> list[str]:
    """Gradient-reduction units in a fixed order: embedding, every block, head, and the tied
    embedding/head matrix (held by the first and the last stage) when the model ties them."""
    tied = [TIED_UNIT] if has_tied_unit(spec) else []
    return [EMBED_UNIT, *(block_unit(i) for i in range(spec.num_layers)), HEAD_UNIT, *tied]


def unit_ranks(plan: Plan, by_rank: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """For every unit, the ranks holding it: one per replica. When replicas split the model the
    same way these are the same stage of every replica; otherwise per-layer-range sets."""
    roles = layout(plan, by_rank)
    out: dict[str, list[int]] = {u: [] for u in units_of_model(plan.model)}
    for r in roles:
        st = plan.replicas[r.replica].stages[r.stage_index]
        mine = [block_unit(i) for i in st.layers]
        if r.first:
            mine.append(EMBED_UNIT)
        if r.last:
            mine.append(HEAD_UNIT)
        if (r.first or r.last) and has_tied_unit(plan.model):
            mine.append(TIED_UNIT)
        for u in mine:
            out[u].append(r.rank)
    return {u: tuple(sorted(v)) for u, v in out.items()}


def schedule_for(plan: Plan, num_stages: int, num_micro_batches: int) -> tuple[str, str]:
    """(schedule actually run, note). 1F1B needs at least as many micro-batches as stages;
    interleaved needs several stages per device, which a plan with one stage per device lacks."""
    want = plan.schedule
    if num_stages == 1:
        return "local", ""
    if want == "interleaved":
        return ("1f1b" if num_micro_batches >= num_stages else "gpipe",
                "interleaved needs several stages per device; this plan has one, ran 1F1B order")
    if want == "1f1b" and num_micro_batches < num_stages:
        return "gpipe", f"1F1B needs >= {num_stages} micro-batches, replica has {num_micro_batches}: ran GPipe"
    return want, ""


def check_runnable(plan: Plan, pool: object, *, world_size: int | None = None,
                   model: ModelSpec | None = None, source: str = "<plan>") -> None:
    """Refuse, with the field and the fix, any plan this runtime cannot run on this pool."""
    plan.check(source)
    plan.check_against_pool(pool, source)
    if model is not None and model != plan.model:
        raise PlanError(f"{source}: model: the plan is for {plan.model.name!r} "
                        f"({plan.model.num_layers} layers, dim {plan.model.dim}), the job trains "
                        f"{model.name!r} ({model.num_layers} layers, dim {model.dim}). "
                        "Fix: re-plan for this model with `chipfuse plan`")
    if plan.model.family not in FAMILIES:
        raise PlanError(f"{source}: model.family: {plan.model.family!r} has no stage builder. "
                        f"Fix: use one of {FAMILIES}")
    for i, rep in enumerate(plan.replicas):
        for j, st in enumerate(rep.stages):
            if len(st.devices) != 1:
                raise PlanError(f"{source}: replicas[{i}].stages[{j}].devices: {len(st.devices)} devices in "
                                "one stage (tensor-parallel or sharded stage groups) are not run by the "
                                "pipeline runtime yet. Fix: give each stage one device, or make each "
                                "device its own replica")
            # Sharding inside a one-device group shards nothing; optimizer offload keeps the AdamW
            # state in host memory (the runtime leaves it out of the device's memory count).
            if st.offload == "params":
                raise PlanError(f"{source}: replicas[{i}].stages[{j}].offload: 'params' is not run inside "
                                "pipelines yet. Fix: use 'none' or 'optimizer', or a pure data-parallel plan")
    if plan.sync.islands:
        raise PlanError(f"{source}: sync.islands: DiLoCo islands are not run by the pipeline runtime. "
                        "Fix: drop sync.islands for synchronous training")
    n = len(plan.devices)
    if world_size is not None and world_size != n:
        raise PlanError(f"{source}: the plan uses {n} devices ({', '.join(plan.devices)}) but the job "
                        f"has {world_size} ranks. Fix: start it with --nproc-per-node {n}")
