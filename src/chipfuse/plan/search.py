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

import itertools
import time
from dataclasses import dataclass, field, replace

from chipfuse.cluster.pool import Pool
from chipfuse.errors import PlanError
from chipfuse.model.costs import DTYPE_BYTES
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.baselines import baselines
from chipfuse.plan.context import Context, Scored
from chipfuse.plan.cost import Prediction
from chipfuse.plan.memory import state_bytes, usable_bytes
from chipfuse.plan.plan import Plan
from chipfuse.plan.profile import Profile
from chipfuse.plan.templates import (
    Template,
)


class NoPlanFits(PlanError):
    """Nothing the search tried fits in memory; the message says how much is missing and what would fit."""

    def __init__(self, message: str, *, missing_bytes: int, suggestions: list[str]):
        super().__init__(message)
        self.missing_bytes = missing_bytes
        self.suggestions = suggestions


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


def search(pool: Pool, model: ModelSpec, *, global_batch: int, seq_len: int, time_budget_s: float = 5.0,
           profile: Profile | None = None, dtype: str = "bf16", optimizer_dtype: str = "fp32",
           schedule: str = "1f1b", max_group: int | None = None, pipeline: bool | None = None,
           _refuse: bool = True) -> SearchResult:
    """The best plan found within `time_budget_s`, with its prediction and the simple strategies'.

    `pipeline`: None searches every layout; True only replicas of several stages, False only
    one-stage replicas (re-planning after a lost device keeps the plan's kind: runtime/endure/replan.py)."""
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
