"""What one plan search shares: the pool index, the model's costs, the template solver and the
settings (`Context`), and a plan scored by the cost model (`Scored`). The search (plan.search) and
the simple strategies it is compared with (plan.baselines) both build and score plans through it."""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field

from chipfuse.cluster.pool import Pool
from chipfuse.model.costs import ModelCosts, model_costs
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


@dataclass(kw_only=True)
class Scored:
    plan: Plan
    prediction: Prediction
    combo: list[Template] | None = None
    """The templates the plan was built from (search candidates only)."""


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
