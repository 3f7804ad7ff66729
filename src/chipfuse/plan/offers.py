"""What `chipfuse plan` offers beside the best synchronous plan: changes to what is learned, never applied
unless the user asks.

The planner's own search only changes how the work is split, which leaves the trained model as one
big device would train it. Some changes buy speed or memory by changing the training itself:

- DiLoCo islands (plan.islands): synchronous inside well-connected islands, an outer step every H
  steps between them. Expected loss cost: benchmarks/slow_link.py measured a loss gap of -0.0002
  to +0.024 (relative, at equal tokens) with at least 16 outer rounds, 0.032 with 6
  (docs/slow_links.md).
- low-bit optimizer state (int8 / int4 AdamW moments, torchao): less memory per device, about the
  same step time. Expected loss cost: tests/test_memory_train.py holds int8 within 1e-3 of fp32.
- fp16 with loss scaling on chips without bf16 (V100, T4, Turing): a bf16 plan computes there in
  fp32 (what the runtime does); fp16 would use their 16-bit tensor cores. chipfuse train does not
  run fp16 yet (its pre-flight check refuses it), so this is a prediction only.

Each offer carries its predicted speed-up over the synchronous plan, what it changes, its expected
loss cost, and the flag that applies it. `--sync auto` applies islands when they predict more
tokens/s, `--sync islands` whenever the links call for them, `--sync sync` (the default) never.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from chipfuse.cluster.pool import Pool
from chipfuse.plan.cost import predict
from chipfuse.plan.islands import SyncAdvice, advise_sync
from chipfuse.plan.plan import Plan
from chipfuse.plan.profile import Profile

SYNC_MODES = ("sync", "auto", "islands")
ISLANDS_LOSS_COST = ("loss +0.0 to +2.4% at equal tokens with >= 16 outer rounds, +3.2% with 6 "
                     "(benchmarks/slow_link.py, docs/slow_links.md)")
INT8_LOSS_COST = "final loss within 0.1% of fp32 state (tests/test_memory_train.py)"


@dataclass(frozen=True, kw_only=True)
class Offer:
    name: str
    changes: str
    """What about training it changes."""
    predicted_step_s: float
    speedup: float
    """Predicted tokens/s over the synchronous plan's."""
    memory_saved_bytes: int
    """On the device that needs the most."""
    loss_cost: str
    apply: str
    """The flag that applies it (or why it cannot be applied yet)."""
    applied: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changes": self.changes, "predicted_step_s": self.predicted_step_s,
                "speedup": self.speedup, "memory_saved_bytes": self.memory_saved_bytes, "loss_cost": self.loss_cost,
                "apply": self.apply, "applied": self.applied}


def offers(res: Any, pool: Pool, profile: Profile | None, *, sync: str = "sync") -> tuple[Any, list[Offer], SyncAdvice]:
    """(the result to show, the offers, the island advice). res: plan.search.SearchResult of the synchronous
    search; the result shown is it, or its islands version when `sync` asks for it."""
    plan, pred = res.plan, res.prediction
    out: list[Offer] = []
    isl, advice = best_with_islands(res, pool, profile)
    shown = res
    if advice.sync.islands and isl.plan.sync.islands:
        speedup = isl.prediction.tokens_per_s / pred.tokens_per_s
        applied = sync == "islands" or (sync == "auto" and speedup > 1.0)
        out.append(Offer(name="DiLoCo islands", changes=f"training algorithm: {len(advice.sync.islands)} islands, "
                         f"outer step every {advice.sync.outer_every} steps, {advice.sync.compression} payload "
                         f"({advice.reason})", predicted_step_s=isl.prediction.step_s, speedup=speedup,
                         memory_saved_bytes=0, loss_cost=ISLANDS_LOSS_COST, apply="--sync islands", applied=applied))
        if applied:
            shown = isl
    if plan.optimizer_dtype == "fp32":
        low = replace(plan, optimizer_dtype="int8")
        lp = predict(low, pool, profile)
        saved = max(pred.memory_bytes.values()) - max(lp.memory_bytes.values())
        out.append(Offer(name="8-bit optimizer state", changes="AdamW moments quantised to int8 (torchao)",
                         predicted_step_s=lp.step_s, speedup=pred.step_s / lp.step_s if lp.step_s else 1.0,
                         memory_saved_bytes=int(saved), loss_cost=INT8_LOSS_COST, apply="--optimizer-dtype int8"))
    no_bf16 = sorted({pool.device(d).chip.name for d in plan.devices if not pool.device(d).chip.has_bf16})
    if plan.dtype == "bf16" and no_bf16:
        fp16 = replace(plan, dtype="fp16")
        fp = predict(fp16, pool, profile)
        out.append(Offer(name="fp16 on chips without bf16", changes=f"{', '.join(no_bf16)} compute in fp16 with "
                         "loss scaling instead of fp32", predicted_step_s=fp.step_s,
                         speedup=pred.step_s / fp.step_s if fp.step_s else 1.0, memory_saved_bytes=0,
                         loss_cost="fp16 range: loss scaling needed; usually matches bf16/fp32 loss",
                         apply="--dtype fp16 (predicted only: chipfuse train refuses fp16 before start today)"))
    return shown, out, advice


def dtype_notes(plan: Any, pool: Pool) -> list[str]:
    """What each chip really computes in, where it differs from the plan's dtype."""
    notes = []
    if plan.dtype == "bf16":
        for chip in sorted({pool.device(d).chip.name for d in plan.devices if not pool.device(d).chip.has_bf16}):
            notes.append(f"{chip} has no bf16: it computes this bf16 plan in fp32 (as chipfuse train does); "
                         "see the fp16 offer below")
    return notes


def best_with_islands(res: Any, pool: Pool, profile: Any = None) -> tuple[Any, SyncAdvice]:
    """The searched plan, or a plan that spans a slow link run as DiLoCo islands when that predicts
    more tokens/s. Candidates: the searched plan and each simple strategy's plan (the search itself
    scores plans as synchronous, so a plan leaving a slow site out can beat them there).
    res: plan.search.SearchResult; returns it (or a copy with the islands plan) and the advice."""
    def advised(plan: Plan, pred: Any) -> tuple[Plan, Any, SyncAdvice]:
        adv = advise_sync(plan, pool, compute_s=pred.breakdown["pipeline_s"])
        if not adv.sync.islands:
            return plan, pred, adv
        isl = replace(plan, sync=adv.sync, strategy="chipfuse")
        return isl, predict(isl, pool, profile), adv

    plan, pred, adv = advised(res.plan, res.prediction)
    best = replace(res, plan=plan, prediction=pred)
    for name, sc in res.baselines.items():
        if sc is None or not sc.prediction.fits:
            continue
        plan, pred, cand = advised(sc.plan, sc.prediction)
        if cand.sync.islands and pred.fits and pred.tokens_per_s > best.prediction.tokens_per_s:
            best = replace(res, plan=plan, prediction=pred,
                           notes=[*res.notes, f"the {name!r} plan run as DiLoCo islands ({cand.reason})"])
            adv = cand
    return best, adv
