"""Plan search: the best plan found within a time budget, beside the simple strategies.

What it enumerates (see docs/planner.md):
1. per kind of device: unit configs (g devices in a node, tensor degree t), pipeline depth p,
   micro-batch size; each solved by chipfuse.plan.partition with a memory option per stage;
2. mixed pipelines: subsets of kinds in an order of chip types (every order for up to three kinds,
   else by memory and by speed), with the units of each kind dealt evenly over R replicas;
3. combinations: for every subset of kinds, each kind's best template side by side as unequal
   data-parallel replicas (kinds left out are the devices that only slow the job), and each mixed
   template alone; the simple strategies are candidates too.
Templates are ranked with a quick estimate; candidates are then built as Plans, given shares
(chipfuse.plan.balance) and predicted with chipfuse.plan.cost.predict, best first, until the budget
runs out. The winner's templates are re-solved with the exact partition solver.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field, replace

from chipfuse.cluster.pool import Pool
from chipfuse.errors import PlanError
from chipfuse.model.costs import DTYPE_BYTES, ModelCosts, model_costs
from chipfuse.model.registry import tp_refusal
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.balance import ReplicaRate, balance_shares
from chipfuse.plan.cost import Prediction, predict
from chipfuse.plan.hardware import PoolIndex, ring_allreduce_s
from chipfuse.plan.memory import state_bytes, usable_bytes
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.plan.profile import Profile
from chipfuse.plan.templates import (
    OFFLOADS,
    Block,
    Kind,
    Template,
    TemplateSolver,
    device_kinds,
    unit_configs,
)

DEPTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
MICRO_BATCHES = (1, 2, 4, 8, 16)


class NoPlanFits(PlanError):
    """Nothing the search tried fits in memory; the message says how much is missing and what would fit."""

    def __init__(self, message: str, *, missing_bytes: int, suggestions: list[str]):
        super().__init__(message)
        self.missing_bytes = missing_bytes
        self.suggestions = suggestions


@dataclass(kw_only=True)
class Scored:
    plan: Plan
    prediction: Prediction
    combo: list[Template] | None = None
    """The templates the plan was built from (search candidates only)."""


@dataclass(kw_only=True)
class SearchResult:
    plan: Plan
    prediction: Prediction
    baselines: dict[str, Scored | None]
    """Per simple strategy: its plan and prediction (None when the strategy has no plan at all)."""
    search_s: float
    candidates: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The `chipfuse plan --json` document (Plan.from_json reads its `plan` key)."""
        def pred(plan: Plan, p: Prediction) -> dict:
            return {"step_s": p.step_s, "tokens_per_s": p.tokens_per_s, "mfu": p.mfu, "fits": p.fits,
                    "memory_bytes": p.memory_bytes, "devices": len(plan.devices)}
        return {"plan": self.plan.to_dict(),
                "predicted": {**pred(self.plan, self.prediction), "breakdown": self.prediction.breakdown},
                "baselines": {k: pred(v.plan, v.prediction) if v else None for k, v in self.baselines.items()},
                "search_s": self.search_s, "candidates": self.candidates, "notes": self.notes}


@dataclass(kw_only=True)
class Context:
    """Everything one search shares: pool index, model costs, template solver, settings."""

    pool: Pool
    model: ModelSpec
    global_batch: int
    seq_len: int
    dtype: str
    optimizer_dtype: str
    schedule: str
    profile: Profile | None
    ix: PoolIndex
    costs: ModelCosts
    kinds: list[Kind]
    solver: TemplateSolver
    max_group: int | None = None
    """Largest stage group (1: single-device stages only, the baseline of benchmarks/plan_space.py)."""
    _homogeneous: dict[int, list[Template]] = field(default_factory=dict)

    @classmethod
    def make(cls, pool: Pool, model: ModelSpec, *, global_batch: int, seq_len: int, dtype: str = "bf16",
             optimizer_dtype: str = "fp32", schedule: str = "1f1b", profile: Profile | None = None,
             max_group: int | None = None) -> Context:
        ix = PoolIndex(pool, profile, dtype)
        costs = model_costs(model, seq_len)
        kinds = device_kinds(ix)
        solver = TemplateSolver(ix, costs, kinds, dtype=dtype, optimizer_dtype=optimizer_dtype, schedule=schedule,
                                # A CPU's memory is host memory: offload saves nothing and the runtime refuses it.
                                offloads=("none",) if all(d.kind.host_memory for d in pool.devices) else OFFLOADS)
        return cls(pool=pool, model=model, global_batch=global_batch, seq_len=seq_len, dtype=dtype,
                   optimizer_dtype=optimizer_dtype, schedule=schedule, profile=profile, ix=ix, costs=costs,
                   kinds=kinds, solver=solver, max_group=max_group)

    def unit_configs(self, kind: int) -> list[tuple[int, int]]:
        """(group size, tp degree) of one kind, as the runtime runs them: a group is tensor-parallel
        over all its devices or sharded over all of them (runtime.parallel.topology refuses a mix), and
        tensor-parallel only for an architecture with a tensor-parallel plan (its family's row: model.registry.tp_refusal)."""
        tp_ok = tp_refusal(self.model) is None
        return [(g, t) for g, t in unit_configs(self.kinds[kind], self.costs, max_group=self.max_group)
                if t == 1 or (t == g and tp_ok)]

    @functools.cached_property
    def total_rate(self) -> float:
        return sum(k.rate * k.count for k in self.kinds)

    def predict(self, plan: Plan) -> Prediction:
        return predict(plan, self.pool, self.profile, index=self.ix)

    # ------------------------------------------------------------------ templates -> plans
    def estimate(self, tpl: Template) -> float:
        """Quick samples/s of a solved template's replicas (share by rate, exposed sync ignored but its size)."""
        if not tpl.layers:
            return 0.0
        share = self.global_batch * self.rate_of(tpl) / self.total_rate / tpl.replicas
        m = max(1, math.ceil(share / tpl.mbs))
        step = tpl.fill_s + m * tpl.steady_s
        sb = state_bytes(self.dtype, self.optimizer_dtype)
        biggest = max(tpl.layers) * self.costs.block_params * sb.grads
        bw, lat = self.ix.pool.default_link.bandwidth, self.ix.pool.default_link.latency_s
        sync = max(0.0, ring_allreduce_s(biggest, tpl.replicas, bw, lat) - min(tpl.stage_s) * 2 / 3)
        return tpl.replicas * m * tpl.mbs / (step + sync)

    def rate_of(self, tpl: Template) -> float:
        return tpl.replicas * sum(self.kinds[b.kind].rate * b.g * b.count for b in tpl.blocks)

    def build(self, tpls: list[Template], strategy: str) -> Plan:
        """Replicas of each template on their units, shares balanced on the templates' pipeline times."""
        # GPipe holds every micro-batch's activations: a replica may not take more than it was solved for.
        gpipe = self.schedule == "gpipe"
        rates = [ReplicaRate(fill_s=t.fill_s, steady_s=t.steady_s, micro_batch_size=t.mbs, count=t.replicas,
                             max_share=t.m_est * t.mbs if gpipe else None) for t in tpls]
        shares = balance_shares(rates, self.global_batch)
        replicas: list[Replica] = []
        used: set[str] = set()
        for tpl, sh in zip(tpls, shares, strict=True):
            for r in range(tpl.replicas):
                if sh[r] == 0:
                    continue  # a replica with no samples would only join the gradient sync: leave it out
                units = self.solver.placement(tpl, r)
                first, stages = 0, []
                for (_k, _g, t), units_i, n, (ck, sd, of) in zip(tpl.stages, units, tpl.layers, tpl.options, strict=True):
                    stages.append(Stage(devices=units_i, first_layer=first, num_layers=n, tp_degree=t,
                                        dp_degree=len(units_i) // t,
                                        checkpoint=ck, shard=sd, offload=of))
                    first += n
                    used.update(units_i)
                # A sharded group splits each micro-batch by rows: at least one row per member.
                rows = max([st.dp_degree for st in stages] + [tpl.mbs])
                replicas.append(Replica(stages=tuple(stages), batch_share=sh[r], micro_batch_size=min(rows, sh[r])))
        excluded = tuple(d.name for d in self.pool.devices if d.name not in used)
        return Plan(model=self.model, global_batch=self.global_batch, seq_len=self.seq_len, replicas=tuple(replicas),
                    schedule=self.schedule, dtype=self.dtype, optimizer_dtype=self.optimizer_dtype, excluded=excluded,
                    strategy=strategy, pool=self.pool.name)

    # ------------------------------------------------------------------ enumeration
    def micro_batch_sizes(self) -> list[int]:
        """Sizes up to the batch; past 8k tokens a micro-batch gains nothing more in kernel efficiency."""
        cap = max(1, self.global_batch)
        return [b for b in MICRO_BATCHES if b <= cap and (b == 1 or (b // 2) * self.seq_len < 8192)] or [1]

    def homogeneous(self, kind: int, deadline: float) -> list[Template]:
        """Every solved single-kind template found by the deadline (cached: the baselines reuse them)."""
        if kind in self._homogeneous:
            return list(self._homogeneous[kind])
        out = self._homogeneous_uncached(kind, deadline)
        self._homogeneous[kind] = list(out)  # even when cut short: the time budget rules the baselines too
        return out

    def _homogeneous_uncached(self, kind: int, deadline: float) -> list[Template]:
        out: list[Template] = []
        L = self.costs.num_layers
        # Most promising group sizes first (in case the deadline cuts the loop): about as many devices
        # as it takes to hold the model's state once, the largest tensor degree first.
        sb = state_bytes(self.dtype, self.optimizer_dtype)
        need = self.costs.total_params * sb.total / max(1, usable_bytes(self.ix.dev[self.kinds[kind].per_node[0][1][0]]))
        cfgs = sorted(self.unit_configs(kind),
                      key=lambda gt: (abs(math.log2(gt[0]) - math.log2(max(1.0, min(need, 8.0)))), -gt[1]))
        for g, t in cfgs:
            n_units = len(self.solver.units(kind, g))
            depths = sorted({p for p in DEPTHS if p <= min(L, n_units)} | ({n_units} if n_units <= L else set()))
            for mbs in self.micro_batch_sizes():
                best, since = 0.0, 0
                for p in depths:
                    if time.perf_counter() > deadline and out:
                        return out
                    tpl = Template(blocks=(Block(kind=kind, g=g, t=t, count=p),), mbs=mbs, replicas=n_units // p)
                    tpl.m_est = self._m_est(tpl)
                    if self.solver.solve(tpl).layers:
                        out.append(tpl)
                        est = self.estimate(tpl)
                        best, since = (est, 0) if est > best else (best, since + 1)
                        if since >= 3:  # deeper pipelines only add bubbles from here on
                            break
        return out

    def mixed(self, subset: tuple[int, ...], best_cfg: dict[int, tuple[int, int]], deadline: float) -> list[Template]:
        L = self.costs.num_layers
        orders = list(itertools.permutations(subset)) if len(subset) <= 3 else list({
            tuple(sorted(subset, key=key)) for key in (lambda k: -self.kinds[k].memory_bytes,
                                                       lambda k: self.kinds[k].memory_bytes,
                                                       lambda k: -self.kinds[k].rate, lambda k: self.kinds[k].rate)})
        n_units = {k: len(self.solver.units(k, best_cfg[k][0])) for k in subset}
        lo = min(n_units.values())
        rs = sorted({max(1, lo // j) for j in (1, 2, 3, 4, 6, 8, 16)} | {1})
        out: list[Template] = []
        for order in orders:
            for R in rs:
                counts = {k: n_units[k] // R for k in subset}
                if min(counts.values()) < 1 or sum(counts.values()) > L:
                    continue
                for mbs in self.micro_batch_sizes():
                    if time.perf_counter() > deadline and out:
                        return out
                    blocks = tuple(Block(kind=k, g=best_cfg[k][0], t=best_cfg[k][1], count=counts[k]) for k in order)
                    tpl = Template(blocks=blocks, mbs=mbs, replicas=R)
                    tpl.m_est = self._m_est(tpl)
                    if self.solver.solve(tpl).layers:
                        out.append(tpl)
        return out

    def _m_est(self, tpl: Template) -> int:
        share = self.global_batch * self.rate_of(tpl) / self.total_rate / max(1, tpl.replicas)
        return max(1, math.ceil(share / tpl.mbs))


def search(pool: Pool, model: ModelSpec, *, global_batch: int, seq_len: int, time_budget_s: float = 5.0,
           profile: Profile | None = None, dtype: str = "bf16", optimizer_dtype: str = "fp32",
           schedule: str = "1f1b", max_group: int | None = None, pipeline: bool | None = None,
           _refuse: bool = True) -> SearchResult:
    """The best plan found within `time_budget_s`, with its prediction and the simple strategies'.

    `pipeline`: None searches every layout; True only replicas of several stages, False only
    one-stage replicas (re-planning after a lost device keeps the plan's kind: runtime/endure/replan.py)."""
    from chipfuse.plan.baselines import baselines

    t0 = time.perf_counter()
    if global_batch <= 0:
        raise PlanError(f"--global-batch is {global_batch}. Fix: use a positive number of samples")
    if not 0 < seq_len <= model.seq_len:
        raise PlanError(f"--seq-len is {seq_len}, model {model.name!r} allows 1..{model.seq_len}. Fix: lower it")
    ctx = Context.make(pool, model, global_batch=global_batch, seq_len=seq_len, dtype=dtype,
                       optimizer_dtype=optimizer_dtype, schedule=schedule, profile=profile, max_group=max_group)
    # 1. each kind alone (fastest kind first: the fastest-only baseline reuses it)
    per_kind: dict[int, list[Template]] = {}
    order = sorted(range(len(ctx.kinds)), key=lambda k: -ctx.kinds[k].rate)
    for j, k in enumerate(order):
        share = (time_budget_s * 0.5 - (time.perf_counter() - t0)) / (len(order) - j)
        tpls = [t for t in ctx.homogeneous(k, time.perf_counter() + share) if _kind_ok(t, pipeline)]
        tpls.sort(key=ctx.estimate, reverse=True)
        if tpls:
            per_kind[k] = tpls[:2]
    base = baselines(ctx)
    scored: list[Scored] = [s for s in base.values() if s is not None and _plan_kind_ok(s.plan, pipeline)]
    deadline = t0 + time_budget_s * 0.75
    # 2. mixed pipelines over subsets of kinds
    mixed: list[Template] = []
    if len(ctx.kinds) > 1 and pipeline is not False:
        # Unit configs per kind: its best alone, single devices, whole nodes at the largest tensor degree.
        cfg_maps: list[dict[int, tuple[int, int]]] = [{}, {}, {}]
        for k in range(len(ctx.kinds)):
            cands = per_kind.get(k)
            cfgs = ctx.unit_configs(k)
            cfg_maps[0][k] = (cands[0].blocks[0].g, cands[0].blocks[0].t) if cands else (1, 1)
            cfg_maps[1][k] = (1, 1)
            cfg_maps[2][k] = max(cfgs)
        unique = [m for i, m in enumerate(cfg_maps) if m not in cfg_maps[:i]]
        for cfg in unique:
            for size in range(len(ctx.kinds), 1, -1):
                for subset in itertools.combinations(range(len(ctx.kinds)), size):
                    mixed += ctx.mixed(subset, cfg, deadline)
        mixed.sort(key=ctx.estimate, reverse=True)
    # 3. combinations, quickest estimate first
    combos: list[list[Template]] = []
    kinds_ok = sorted(per_kind, key=lambda k: -ctx.kinds[k].rate)
    for size in range(len(kinds_ok), 0, -1):
        for subset in itertools.combinations(kinds_ok, size):
            combos.append([per_kind[k][0] for k in subset])
    for k in kinds_ok:
        if len(per_kind[k]) > 1:
            combos.append([per_kind[j][1 if j == k else 0] for j in kinds_ok])
    for t in mixed[:16]:
        combos.append([t])
        # Kinds a mixed pipeline leaves out may still help as replicas of their own.
        rest = [per_kind[k][0] for k in kinds_ok if k not in {b.kind for b in t.blocks}]
        if rest:
            combos.append([t, *rest])
    combos.sort(key=lambda c: -sum(ctx.estimate(t) for t in c))
    stop = t0 + time_budget_s * 0.9
    evaluated = 0
    for c in combos:
        if time.perf_counter() > stop and evaluated:
            break
        plan = ctx.build(c, "chipfuse")
        scored.append(Scored(plan=plan, prediction=ctx.predict(plan), combo=c))
        evaluated += 1
    fitting = [s for s in scored if s.prediction.fits and _plan_kind_ok(s.plan, pipeline)]
    if not fitting:
        if not _refuse:
            raise NoPlanFits("nothing fits", missing_bytes=0, suggestions=[])
        raise refusal(ctx, scored, time_budget_s)
    best = max(fitting, key=lambda s: s.prediction.tokens_per_s)
    combo = best.combo
    if combo is not None and time.perf_counter() < t0 + time_budget_s:
        exact = [ctx.solver.solve(replace(t), exact=True) for t in combo]
        plan = ctx.build(exact, "chipfuse")
        pred = ctx.predict(plan)
        if pred.fits and pred.tokens_per_s > best.prediction.tokens_per_s:
            best = Scored(plan=plan, prediction=pred)
    notes = []
    plan = best.plan if best.plan.strategy == "chipfuse" else replace(best.plan, strategy="chipfuse")
    if best.plan.strategy != "chipfuse":
        notes.append(f"the best plan found is the {best.plan.strategy!r} strategy's")
    return SearchResult(plan=plan, prediction=best.prediction, baselines=base,
                        search_s=time.perf_counter() - t0, candidates=len(scored), notes=notes)


def _kind_ok(tpl: Template, pipeline: bool | None) -> bool:
    return pipeline is None or (sum(b.count for b in tpl.blocks) > 1) == pipeline


def _plan_kind_ok(plan: Plan, pipeline: bool | None) -> bool:
    return pipeline is None or any(len(r.stages) > 1 for r in plan.replicas) == pipeline


def refusal(ctx: Context, tried: list[Scored], budget_s: float) -> NoPlanFits:
    """Say how much memory is missing and which memory strategy would make the job fit."""
    sb = state_bytes(ctx.dtype, ctx.optimizer_dtype)
    need = ctx.costs.total_params * sb.total
    have = sum(usable_bytes(d) for d in ctx.pool.devices)
    # The least any plan needs: gradients stay on the devices (weights and optimizer offloaded),
    # fully checkpointed activations of one sample, the last stage's logits.
    c, s = ctx.costs, ctx.seq_len
    frugal = (c.total_params * sb.grads + c.num_layers * s * c.act_bytes("full", ctx.dtype)
              + s * c.logits_bytes_per_token(ctx.dtype))
    # ... and the smallest piece one device must hold: one block with its rebuilt activations.
    piece = (c.block_params * (sb.grads + 2 * sb.weights) + s * c.act_bytes("none", ctx.dtype)
             + s * c.logits_bytes_per_token(ctx.dtype))
    biggest = max(usable_bytes(d) for d in ctx.pool.devices)
    if frugal > have:
        missing, why = int(frugal - have), "in total"
    elif piece > biggest:
        missing, why = int(piece - biggest), "on the largest device (one block with its activations and logits)"
    else:
        closest = min(tried, key=lambda t: sum(t.prediction.breakdown["over_capacity"].values()), default=None)
        missing = int(sum(closest.prediction.breakdown["over_capacity"].values())) if closest else int(need - have)
        why = "over the devices of the closest plan tried"
    suggestions = []
    for label, dtype, opt, seq in (
            ("bf16 compute with fp32 masters (--dtype bf16)", "bf16", ctx.optimizer_dtype, ctx.seq_len),
            ("8-bit optimizer state (--optimizer-dtype int8)", ctx.dtype, "int8", ctx.seq_len),
            ("4-bit optimizer state (--optimizer-dtype int4)", ctx.dtype, "int4", ctx.seq_len),
            ("a sequence length of half", ctx.dtype, ctx.optimizer_dtype, max(1, ctx.seq_len // 2))):
        if (dtype, opt, seq) == (ctx.dtype, ctx.optimizer_dtype, ctx.seq_len):
            continue
        try:
            search(ctx.pool, ctx.model, global_batch=ctx.global_batch, seq_len=seq, time_budget_s=min(2.0, budget_s / 4),
                   profile=ctx.profile, dtype=dtype, optimizer_dtype=opt, schedule=ctx.schedule,
                   max_group=ctx.max_group, _refuse=False)
            suggestions.append(label)
        except NoPlanFits:
            pass
    GiB = 1024**3
    msg = (f"no plan fits model {ctx.model.name!r} ({ctx.costs.total_params / 1e9:.2f} B parameters, "
           f"{need / GiB:.1f} GiB of weights, gradients and optimizer state in {ctx.dtype}/{ctx.optimizer_dtype}) "
           f"on pool {ctx.pool.name!r} ({have / GiB:.1f} GiB usable over {len(ctx.pool.devices)} devices): "
           f"about {missing / GiB:.2f} GiB missing {why}, even with pipelining, sharding, full checkpointing and "
           "offload. ")
    if suggestions:
        msg += "It would fit with " + " or ".join(suggestions) + ". Fix: plan with that setting"
    else:
        msg += "Fix: add devices with about that much more memory, or choose a smaller model"
    return NoPlanFits(msg, missing_bytes=missing, suggestions=suggestions)


__all__ = ["search", "SearchResult", "NoPlanFits", "Context", "DTYPE_BYTES"]
