"""The job's topology: who does what under a plan, whether it can run here, and every process group.

One object, built once from the plan, the pool and the ranks, in two parts:

- `Topology.of(plan, pool, ...)` is pure (no torch.distributed): every rank's role, the stage
  groups, the pipelines, which ranks hold each layer. `check()` validates everything about the
  plan against the ranks and this host and raises ONE PlanError naming the field, what was found
  and the fix (the launcher calls it before any worker starts; each worker calls it again).
- `Topology.create_groups(rank)` is collective: every rank calls it at the same point and it makes
  every process group and device mesh of the job, in one fixed order (torch.distributed.new_group
  must be called by every rank, for every group, even the ones it is not in):
    1. one group (and 1-D DeviceMesh) per stage group of several devices, and a mesh of one for
       a lone device whose stage offloads its parameters (FSDP2 runs there too);
    2. one pipeline group per replica of several stages (the groups' leaders, in stage order);
    3. one gradient reducer per distinct set of ranks holding the same layers across replicas,
       each by chip vendor plus a gloo bridge (runtime/sync/groups.py).

Ranks follow plan.devices order (replica by replica, stage by stage, device by device in a group)
unless the launcher chose them (multi-host c10d hands out ranks by arrival): `by_rank` then gives
each rank's device.

A stage group's kind comes from its named degrees (Stage.dims, plan.dims.GroupDims), read once here
into each Role: tensor-parallel when tp_degree == n (every member computes every sample, each holding
1/n of every attention and MLP matrix), FSDP2-sharded when dp_degree == n (each member computes 1/n
of each micro-batch). Mixed groups and expert or context degrees above 1 are refused by check(). The group's first device, its leader, is the one that talks to
the neighbouring stages; the others follow it (runtime/parallel/group.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chipfuse.errors import PlanError
from chipfuse.model.registry import find as find_family
from chipfuse.model.registry import names as family_names
from chipfuse.model.registry import tp_refusal
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.dims import GroupKind
from chipfuse.plan.plan import Plan


@dataclass(frozen=True, kw_only=True)
class Role:
    rank: int
    device: str
    replica: int
    stage_index: int
    num_stages: int
    pipeline_ranks: tuple[int, ...]
    """Leader rank of each stage group of this replica, in stage order."""
    group_ranks: tuple[int, ...] = ()
    """Ranks of this rank's stage group, leader first (empty means this rank alone)."""
    kind: GroupKind = "single"

    @property
    def first(self) -> bool:
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def members(self) -> tuple[int, ...]:
        return self.group_ranks or (self.rank,)

    @property
    def group_size(self) -> int:
        return len(self.members)

    @property
    def group_index(self) -> int:
        return self.members.index(self.rank)

    @property
    def leader(self) -> bool:
        return self.group_index == 0


def units_of_model(spec: ModelSpec) -> list[str]:
    """Gradient-reduction units in a fixed order: embedding, every block, head, and the tied
    embedding/head matrix (held by the first and the last stage) when the model ties them."""
    from chipfuse.model.split import EMBED_UNIT, HEAD_UNIT, TIED_UNIT, block_unit, has_tied_unit

    tied = [TIED_UNIT] if has_tied_unit(spec) else []
    return [EMBED_UNIT, *(block_unit(i) for i in range(spec.num_layers)), HEAD_UNIT, *tied]


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


@dataclass(kw_only=True)
class Groups:
    """This rank's process groups (made by Topology.create_groups)."""

    stage: Any = None
    """This rank's stage group (None when alone)."""
    mesh: Any = None
    """1-D DeviceMesh over the stage group (tensor parallel and FSDP2 run on it)."""
    pipeline: Any = None
    """This replica's pipeline group of stage leaders (None for a one-stage replica)."""
    reducers: dict[tuple[int, ...], Any] = field(default_factory=dict)
    """Rank set -> runtime.sync.groups.Reducer, for the sets this rank belongs to."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    plan: Plan
    pool: Any
    by_rank: tuple[str, ...]
    """Device of each rank, in rank order."""
    roles: tuple[Role, ...]

    # ------------------------------------------------------------------ building
    @classmethod
    def of(cls, plan: Plan, pool: Any, by_rank: list[str] | tuple[str, ...] | None = None) -> Topology:
        names = tuple(by_rank) if by_rank is not None else tuple(plan.devices)
        rank_of = {d: i for i, d in enumerate(names)}
        roles: list[Role] = []
        for i, rep in enumerate(plan.replicas):
            leaders = tuple(rank_of[s.devices[0]] for s in rep.stages)
            for j, st in enumerate(rep.stages):
                members = tuple(rank_of[d] for d in st.devices)
                kind = st.dims.kind
                for d in st.devices:
                    roles.append(Role(rank=rank_of[d], device=d, replica=i, stage_index=j, num_stages=len(rep.stages),
                                      pipeline_ranks=leaders, group_ranks=members if len(members) > 1 else (),
                                      kind=kind))
        return cls(plan=plan, pool=pool, by_rank=names, roles=tuple(sorted(roles, key=lambda r: r.rank)))

    def role(self, rank: int) -> Role:
        return self.roles[rank]

    @property
    def world_size(self) -> int:
        return len(self.by_rank)

    def stage_of(self, role: Role) -> Any:
        return self.plan.replicas[role.replica].stages[role.stage_index]

    def unit_ranks(self) -> dict[str, tuple[int, ...]]:
        """For every unit (embedding, block, head, tied), the ranks holding it: every member of every
        stage group that holds it (one group per replica; the tied matrix: the first and the last
        stage's groups of each replica)."""
        from chipfuse.model.split import EMBED_UNIT, HEAD_UNIT, TIED_UNIT, block_unit, has_tied_unit

        tied = has_tied_unit(self.plan.model)
        out: dict[str, list[int]] = {u: [] for u in units_of_model(self.plan.model)}
        for r in self.roles:
            st = self.stage_of(r)
            mine = [block_unit(i) for i in st.layers]
            if r.first:
                mine.append(EMBED_UNIT)
            if r.last:
                mine.append(HEAD_UNIT)
            if tied and (r.first or r.last):
                mine.append(TIED_UNIT)
            for u in mine:
                out[u].append(r.rank)
        return {u: tuple(sorted(v)) for u, v in out.items()}

    @property
    def replicated_units(self) -> bool:
        """Every rank holds the whole model alone: pure data parallel."""
        return all(r.num_stages == 1 and r.group_size == 1 for r in self.roles)

    # ------------------------------------------------------------------ validation
    def check(self, *, world_size: int | None = None, model: ModelSpec | None = None, source: str = "<plan>",
              host_devices: dict[str, int] | None = None) -> None:
        """Everything about the plan against the ranks and this host, before any work: one
        PlanError naming the field, what was found and the fix."""
        plan, pool = self.plan, self.pool
        plan.check(source)
        plan.check_against_pool(pool, source)
        spec = plan.model
        if model is not None and model != spec:
            raise PlanError(f"{source}: model: the plan is for {spec.name!r} ({spec.num_layers} layers, dim "
                            f"{spec.dim}), the job trains {model.name!r} ({model.num_layers} layers, dim {model.dim}). "
                            "Fix: re-plan for this model with `chipfuse plan`")
        if find_family(spec) is None:
            raise PlanError(f"{source}: model.family: {spec.family!r} (model_type {spec.model_type!r}) has no stage "
                            f"builder. Fix: use one of {family_names()}")
        for i, rep in enumerate(plan.replicas):
            for j, st in enumerate(rep.stages):
                where = f"{source}: replicas[{i}].stages[{j}]"
                n = len(st.devices)
                for name, deg, what in (("ep_degree", st.ep_degree, "expert"), ("cp_degree", st.cp_degree, "context")):
                    if deg > 1:
                        raise PlanError(f"{where}.{name}: {deg}, but {what} parallel is not run yet (the degree is "
                                        f"named in the plan for when it lands). Fix: {name} = 1")
                if st.tp_degree > 1 and st.dp_degree > 1:
                    raise PlanError(f"{where}: tp_degree {st.tp_degree} x dp_degree {st.dp_degree} mixes tensor "
                                    "parallel and sharding in one group, which is not run (it needs one 2-D mesh). "
                                    f"Fix: tp_degree = {n} or dp_degree = {n} (or split the group into stages)")
                if st.tp_degree > 1:
                    why = tp_refusal(spec)
                    if why is not None:
                        raise PlanError(f"{where}.tp_degree: {st.tp_degree}, but tensor parallel is not run for "
                                        f"{why}. Fix: tp_degree = 1 (shard the stage or split it into more stages)")
                    for what, val in (("num_heads", spec.num_heads), ("kv_heads", spec.kv_heads), ("ffn", spec.ffn)):
                        if val % st.tp_degree:
                            raise PlanError(f"{where}.tp_degree: {st.tp_degree} does not divide the model's {what} "
                                            f"({val}). Fix: use a tp_degree that divides it")
                    if st.shard != "none":
                        raise PlanError(f"{where}: a tensor-parallel group with shard={st.shard!r} is not run (TP "
                                        "and FSDP2 in one group). Fix: shard = \"none\" for a tensor-parallel stage")
                    real = [d for d in st.devices if not pool.device(d).emulated]
                    if st.offload == "params" and real:
                        raise PlanError(f"{where}.offload: 'params' on tensor-parallel chips {real} needs FSDP2 and "
                                        "tensor parallel on one 2-D mesh, which is not run (on emulated devices the "
                                        "offload is counted, not moved). Fix: offload = \"optimizer\" or \"none\"")
                if st.dims.kind == "fsdp" and rep.micro_batch_size < n:
                    raise PlanError(f"{source}: replicas[{i}].micro_batch_size: {rep.micro_batch_size} samples split "
                                    f"over a sharded group of {n} devices leaves some idle. Fix: micro_batch_size >= {n}")
                vendors = {pool.device(d).vendor for d in st.devices}
                if n > 1 and len(vendors) > 1:
                    raise PlanError(f"{where}.devices: a stage group spans vendors {sorted(vendors)}; its collectives "
                                    "run on one native library. Fix: group devices of one vendor")
                for d in st.devices:
                    if st.offload != "none" and pool.device(d).kind.host_memory:
                        raise PlanError(f"{where}.offload: device {d!r} is a CPU: its memory is host memory, so "
                                        f"offload={st.offload!r} saves nothing. Fix: set offload = \"none\" for its "
                                        "stage and use sharding or checkpointing to save memory")
        if plan.sync.islands:
            self._check_islands(source)
        self.check_ranks(world_size=world_size, source=source)
        if host_devices is not None:
            self.check_host(host_devices, source)

    def check_ranks(self, *, world_size: int | None = None, source: str = "<plan>") -> None:
        """What only the running job knows: its world size and which worker took which device. A
        worker checks this alone; the rest of `check` ran once, in the launcher (runtime/launch/runspec.py)."""
        if sorted(self.by_rank) != sorted(set(self.by_rank)):
            dup = sorted({n for n in self.by_rank if self.by_rank.count(n) > 1})
            raise PlanError(f"devices {dup} were claimed by more than one worker. Fix: give each host its own "
                            "--pool-node, with --nproc-per-node equal to that node's devices in the plan")
        n = len(self.plan.devices)
        if world_size is not None and world_size != n:
            raise PlanError(f"{source}: the plan uses {n} devices ({', '.join(self.plan.devices)}) but the job has "
                            f"{world_size} ranks. Fix: start it with --nproc-per-node {n}")

    def _check_islands(self, source: str) -> None:
        from chipfuse.plan.islands import island_layout, islands_refusal

        why = islands_refusal(self.plan, island_layout(self.plan))
        if why:
            raise PlanError(f"{source}: sync.islands: {why} (docs/slow_links.md)")

    def check_host(self, host_devices: dict[str, int], source: str = "<plan>") -> None:
        """Real (not emulated) devices need their chips on this host: host_devices is the count per
        torch device type (runtime.launch.dist.host_devices)."""
        from chipfuse.runtime.launch.dist import device_type_of

        need: dict[str, list[str]] = {}
        for d in self.plan.devices:
            dev = self.pool.device(d)
            kind = device_type_of(dev)
            if kind != "cpu":
                need.setdefault(kind, []).append(d)
        for kind, names in need.items():
            have = host_devices.get(kind, 0)
            if len(names) > have:
                raise PlanError(f"{source}: devices {names} are real {kind} chips but this host has {have}. Fix: run on "
                                "the host that has them (--pool-node on several hosts), or mark them emulated in the "
                                "pool (`emulate = { speed = ... }`)")

    # ------------------------------------------------------------------ process groups (collective)
    def create_groups(self, rank: int) -> Groups:
        import torch.distributed as dist

        from chipfuse.runtime.launch.dist import collective_timeout, mesh_device_type, vendor_backends
        from chipfuse.runtime.sync.groups import link_backend, make_reducer

        pool = self.pool
        native_of = vendor_backends(pool.devices)
        vendor_of = {r.rank: pool.device(r.device).vendor for r in self.roles}
        out = Groups()
        if not dist.is_initialized():
            return out
        for members in sorted({r.group_ranks for r in self.roles if r.group_ranks}):
            g = dist.new_group(list(members), backend=link_backend({vendor_of[x] for x in members}, native_of),
                                  timeout=collective_timeout())
            if rank in members:
                from torch.distributed.device_mesh import DeviceMesh

                out.stage = g
                out.mesh = DeviceMesh.from_group(g, mesh_device_type(pool.device(self.by_rank[rank])))
        # A lone device with parameter offload runs FSDP2 too: on a mesh of itself, not the world.
        for r in self.roles:
            if r.group_size == 1 and self.stage_of(r).offload == "params":
                g = dist.new_group([r.rank], backend=link_backend({vendor_of[r.rank]}, native_of),
                                  timeout=collective_timeout())
                if r.rank == rank:
                    from torch.distributed.device_mesh import DeviceMesh

                    out.mesh = DeviceMesh.from_group(g, mesh_device_type(pool.device(r.device)))
        for i in range(len(self.plan.replicas)):
            leaders = next(r.pipeline_ranks for r in self.roles if r.replica == i)
            if len(leaders) > 1:
                g = dist.new_group(sorted(leaders), backend=link_backend({vendor_of[x] for x in leaders}, native_of),
                                  timeout=collective_timeout())
                if rank in leaders:
                    out.pipeline = g
        for s in sorted({v for v in self.unit_ranks().values() if self._groups_in(v) > 1}):
            red = make_reducer(s, vendor_of, native_of)
            if rank in s:
                out.reducers[s] = red
        return out

    def _groups_in(self, ranks: tuple[int, ...]) -> int:
        """How many stage groups hold a unit held by `ranks` (one per replica; two per replica of
        several stages for the tied matrix)."""
        return len({(self.roles[r].replica, self.roles[r].stage_index) for r in ranks})

    def describe(self) -> dict:
        return {"ranks": [{"rank": r.rank, "device": r.device, "replica": r.replica, "stage": r.stage_index,
                           "group": list(r.members), "kind": r.kind} for r in self.roles]}


# ---------------------------------------------------------------------------------------------------
# Short forms for callers that need one view (the launcher, tests).


def layout(plan: Plan, by_rank: list[str] | None = None) -> list[Role]:
    """Every rank's role, in rank order."""
    return list(Topology.of(plan, None, by_rank).roles)


def unit_ranks(plan: Plan, by_rank: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    return Topology.of(plan, None, by_rank).unit_ranks()


def check_runnable(plan: Plan, pool: Any, *, world_size: int | None = None, model: ModelSpec | None = None,
                   source: str = "<plan>", host_devices: dict[str, int] | None = None) -> None:
    """Refuse, with the field and the fix, any plan this runtime cannot run on this pool and host."""
    Topology.of(plan, pool).check(world_size=world_size, model=model, source=source, host_devices=host_devices)
