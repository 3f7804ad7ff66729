"""The Plan: a frozen, JSON-serialisable description of how one job uses a pool.

A person can write one by hand; the planner writes the same format. Shape::

    Plan
      replicas: each a pipeline (one or more stages) computing `batch_share` samples of every
                global batch, in micro-batches of `micro_batch_size`. Replicas may differ in
                stage count and layer split; shares need not be equal.
        stages: a contiguous run of transformer blocks [first_layer, first_layer+num_layers)
                on a group of devices. Stage 0 also holds the embedding, the last the head.
                The group's degrees are named (tp, dp, ep, cp: plan.dims.GroupDims, which says
                what kind of group they make): tp_degree == n devices is tensor parallel,
                dp_degree == n shards the stage (FSDP2, ZeRO level `shard`) and splits its
                micro-batches evenly.
      sync:     how replicas combine gradients (every step, or DiLoCo islands over slow links).
      freeze:   units (embed, block<i>, head) whose parameters are not trained (model.converters).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from chipfuse import validate
from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.dims import GroupDims

CHECKPOINT_MODES = ("none", "selective", "full")
SHARD_MODES = ("none", "optimizer", "grads", "full")
OFFLOAD_MODES = ("none", "optimizer", "params")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
DTYPES = ("fp32", "bf16", "fp16")
OPTIMIZER_DTYPES = ("fp32", "bf16", "int8", "int4")
COMPRESSIONS = ("none", "bf16", "fp16")
MAX_MICRO_BATCHES = 10_000
"""Per replica and step: the schedule, the simulator and the trainer loop over each one."""


@dataclass(frozen=True, kw_only=True)
class Stage:
    devices: tuple[str, ...]
    """Device names; several form one group (tensor-parallel or sharded) inside a node."""
    first_layer: validate.Index
    num_layers: validate.Count
    tp_degree: validate.Count = 1
    """Tensor-parallel degree (tp x dp x ep x cp = len(devices))."""
    dp_degree: validate.Index = 0
    """Data (shard) degree; 0 or omitted: the devices left, len(devices) // (tp x ep x cp)."""
    ep_degree: validate.Count = 1
    """Expert-parallel degree (refused above 1 until expert parallel runs)."""
    cp_degree: validate.Count = 1
    """Context-parallel degree (refused above 1 until context parallel runs)."""
    checkpoint: str = "none"
    """Activation checkpointing: none | selective | full."""
    shard: str = ""
    """ZeRO level inside the group (ZeRO-1/2/3 via FSDP2): none | optimizer | grads | full. Omitted:
    "grads" on a data-parallel group (dp_degree > 1, which always runs sharded), else "none"."""
    offload: str = "none"
    """Host-memory offload: none | optimizer | params."""

    def __post_init__(self) -> None:
        # The two omissions a hand-written plan may make are resolved here, once, so every reader and
        # every written plan sees all the degrees and the ZeRO level that runs.
        if self.dp_degree == 0:
            rest = self.tp_degree * self.ep_degree * self.cp_degree
            object.__setattr__(self, "dp_degree", max(1, len(self.devices) // max(1, rest)))
        if self.shard == "":
            object.__setattr__(self, "shard", "grads" if self.dp_degree > 1 else "none")

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @property
    def dims(self) -> GroupDims:
        """The group's degrees and kind (plan.dims): the one place that says what the group is."""
        return GroupDims(tp=self.tp_degree, dp=self.dp_degree, ep=self.ep_degree, cp=self.cp_degree,
                         shard=self.shard)


@dataclass(frozen=True, kw_only=True)
class Replica:
    stages: tuple[Stage, ...]
    batch_share: validate.Index
    """Samples of every global batch this replica computes."""
    micro_batch_size: validate.Count
    """Samples per micro-batch (the last micro-batch may be smaller)."""

    @property
    def num_micro_batches(self) -> int:
        return math.ceil(self.batch_share / self.micro_batch_size) if self.batch_share else 0

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for s in self.stages for d in s.devices)


@dataclass(frozen=True, kw_only=True)
class SyncPlan:
    """How replicas combine. islands=() means one synchronous all-reduce every step."""

    islands: tuple[tuple[str, ...], ...] = ()
    """Groups of well-connected devices; synchronous inside, DiLoCo between."""
    outer_every: validate.Count = 1
    """H: inner steps between outer (cross-island) steps."""
    outer_lr: Annotated[float, validate.Range(0, 100, above=True)] = 0.7
    outer_momentum: Annotated[float, validate.Range(0, 0.999)] = 0.9
    compression: str = "none"
    """Cross-island payload: none | bf16 | fp16."""


class JsonForm:
    """The JSON form every plan dataclass (training, serving) writes: what `read_plan_json` reads."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


@dataclass(frozen=True, kw_only=True)
class Plan(JsonForm):
    model: ModelSpec
    global_batch: validate.Count
    """Samples per optimizer step, over all replicas."""
    seq_len: validate.Count
    replicas: tuple[Replica, ...]
    schedule: str = "1f1b"
    dtype: str = "fp32"
    """Compute dtype; bf16 keeps fp32 master weights."""
    optimizer_dtype: str = "fp32"
    """Optimizer-state dtype (int8/int4 via torchao)."""
    sync: SyncPlan = field(default_factory=SyncPlan)
    excluded: tuple[str, ...] = ()
    """Pool devices the plan leaves out because they would only slow the job."""
    strategy: str = "manual"
    """Who made it: chipfuse | even | fastest-only | proportional-dp | manual."""
    pool: str = ""
    freeze: tuple[str, ...] = ()
    """Units left untrained (model.converters.freeze): embed, head, block2, block0-3, block*. They get no
    gradient, optimizer state or sync traffic."""
    version: Annotated[int, validate.Range(1, 1)] = 1

    # ------------------------------------------------------------------ derived views
    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for r in self.replicas for d in r.devices)

    @property
    def shares(self) -> dict[str, int]:
        """Samples per step of each replica, keyed by its first device."""
        return {r.devices[0]: r.batch_share for r in self.replicas}

    @property
    def is_pure_data_parallel(self) -> bool:
        return all(len(r.stages) == 1 and len(r.stages[0].devices) == 1 for r in self.replicas)

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, d: Any, source: str = "<plan>") -> Plan:
        """A plan from its JSON form, every field checked by type and range (chipfuse.validate), then
        checked as a whole; a bad field is one PlanError naming it."""
        return checked_plan(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        raw = read_plan_json(path, body_key="replicas", writer="chipfuse plan --json")
        return cls.from_dict(raw, source=str(path))

    # ------------------------------------------------------------------ checks
    def check(self, source: str = "<plan>") -> None:
        """Internal consistency (no pool needed). Raises PlanError naming the field and the fix."""

        def fail(where: str, problem: str, fix: str) -> PlanError:
            return PlanError(f"{source}: {where}: {problem}. Fix: {fix}")

        if self.global_batch <= 0:
            raise fail("global_batch", f"is {self.global_batch}", "use a positive number of samples")
        if not 0 < self.seq_len <= self.model.seq_len:
            raise fail("seq_len", f"is {self.seq_len}, model allows 1..{self.model.seq_len}", "lower seq_len")
        for name, val, allowed in (("schedule", self.schedule, SCHEDULES), ("dtype", self.dtype, DTYPES),
                                   ("optimizer_dtype", self.optimizer_dtype, OPTIMIZER_DTYPES)):
            if val not in allowed:
                raise fail(name, f"is {val!r}", f"use one of {allowed}")
        if not self.replicas:
            raise fail("replicas", "is empty", "give at least one replica")
        if self.sync.compression not in COMPRESSIONS:
            raise fail("sync.compression", f"is {self.sync.compression!r}", f"use one of {COMPRESSIONS}")
        total = sum(r.batch_share for r in self.replicas)
        if total != self.global_batch:
            raise fail("replicas[*].batch_share", f"sum to {total}, global_batch is {self.global_batch}",
                       "make the shares add up to global_batch")
        seen: set[str] = set()
        L = self.model.num_layers
        for i, r in enumerate(self.replicas):
            w = f"replicas[{i}]"
            if r.batch_share < 0 or r.micro_batch_size <= 0:
                raise fail(w, f"batch_share={r.batch_share}, micro_batch_size={r.micro_batch_size}",
                           "use batch_share >= 0 and micro_batch_size >= 1")
            if not r.stages:
                raise fail(f"{w}.stages", "is empty", "give at least one stage")
            if r.num_micro_batches > MAX_MICRO_BATCHES:
                raise fail(f"{w}.micro_batch_size", f"{r.num_micro_batches} micro-batches of {r.micro_batch_size} "
                           f"per step", f"use larger micro-batches (at most {MAX_MICRO_BATCHES} per step)")
            nxt = 0
            for j, s in enumerate(r.stages):
                sw = f"{w}.stages[{j}]"
                if s.first_layer != nxt or s.num_layers <= 0:
                    raise fail(f"{sw}.first_layer", f"stage covers layers {s.first_layer}..+{s.num_layers}, "
                               f"expected to start at {nxt}", "make stages contiguous, each with >= 1 layer")
                nxt += s.num_layers
                if not s.devices:
                    raise fail(f"{sw}.devices", "is empty", "name at least one device")
                for name, val, allowed in (("checkpoint", s.checkpoint, CHECKPOINT_MODES),
                                           ("shard", s.shard, SHARD_MODES), ("offload", s.offload, OFFLOAD_MODES)):
                    if val not in allowed:
                        raise fail(f"{sw}.{name}", f"is {val!r}", f"use one of {allowed}")
                wrong = s.dims.problems(len(s.devices))
                if wrong:
                    raise fail(sw, "; ".join(p for p, _ in wrong), "; ".join(f for _, f in wrong))
                for dv in s.devices:
                    if dv in seen:
                        raise fail(f"{sw}.devices", f"device {dv!r} is used twice", "use each device once")
                    seen.add(dv)
            if nxt != L:
                raise fail(f"{w}.stages", f"cover {nxt} layers, the model has {L}", "cover every layer once")
        self._check_freeze(source)
        named = [d for isl in self.sync.islands for d in isl]
        if self.sync.islands and sorted(named) != sorted(seen):
            raise fail("sync.islands", f"name {sorted(named)}, the plan's devices are {sorted(seen)}",
                       "put every device of the plan in exactly one island")

    def _check_freeze(self, source: str) -> None:
        """Every pattern names a unit, and every stage keeps a trainable one: a stage with nothing to
        train has no backward to run and no optimizer to build."""
        from chipfuse.model.converters import frozen_units
        from chipfuse.model.converters.freeze import match_units

        match_units(self.freeze, self.model, where=f"{source}: freeze")
        frozen = frozen_units(self)
        for i, r in enumerate(self.replicas):
            for j, s in enumerate(r.stages):
                units = {f"block{k}" for k in s.layers} | ({"embed"} if j == 0 else set()) | (
                    {"head"} if j == len(r.stages) - 1 else set())
                if units <= frozen:
                    raise PlanError(f"{source}: freeze: every unit of replicas[{i}].stages[{j}] ({', '.join(sorted(units))}) "
                                    "is frozen. Fix: freeze fewer units, or move the stage boundary so each stage "
                                    "trains something")

    def check_against_pool(self, pool: Any, source: str = "<plan>") -> None:
        """The plan names only devices of `pool`, and none of them twice (pool: cluster.Pool)."""
        names = {d.name for d in pool.devices}
        for dv in self.devices:
            if dv not in names:
                raise PlanError(f"{source}: device {dv!r} is not in pool {pool.name!r} "
                                f"(it has {sorted(names)}). Fix: re-plan for this pool with `chipfuse plan`")


def data_parallel_plan(model: ModelSpec, shares: dict[str, int], *, seq_len: int, micro_batch_size: int | dict[str, int],
                       strategy: str = "manual", pool: str = "") -> Plan:
    """A pure data-parallel plan: one whole-model replica per device, with the given shares."""
    mbs = micro_batch_size if isinstance(micro_batch_size, dict) else {d: micro_batch_size for d in shares}
    replicas = tuple(
        Replica(stages=(Stage(devices=(d,), first_layer=0, num_layers=model.num_layers),),
                batch_share=n, micro_batch_size=max(1, min(mbs[d], n) if n else mbs[d]))
        for d, n in shares.items()
    )
    return Plan(model=model, global_batch=sum(shares.values()), seq_len=seq_len, replicas=replicas,
                strategy=strategy, pool=pool)


def checked_plan(cls: Any, d: Any, source: str) -> Any:
    """A plan dataclass (training or serving) from its JSON form: every field by type and range, the
    model's shape, then the plan's own check(). One rule for every kind of plan."""
    plan = validate.build(cls, d, source=source, error=PlanError)
    validate.model_spec(plan.model, source=source, error=PlanError)
    plan.check(source)
    return plan


def read_plan_json(path: str | Path, *, body_key: str, writer: str) -> Any:
    """The parsed JSON of a plan file, or one PlanError naming the file and the fix. Accepts the whole
    output of the command that writes it (`writer`), whose plan sits under "plan"; `body_key` is a
    field only the plan itself has."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"{p}: no such plan file. Fix: write one with `{writer} {p}`") from None
    except OSError as e:
        raise PlanError(f"{p}: cannot read ({e.strerror}). Fix: give the path of a plan JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PlanError(f"{p}: not valid JSON ({e}). Fix: correct the syntax there") from None
    if isinstance(raw, dict) and "plan" in raw and body_key not in raw:
        raw = raw["plan"]
    return raw
