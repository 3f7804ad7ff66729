"""`chipfuse plan`: search a plan for a pool and a model, show it beside the simple strategies."""

from __future__ import annotations

import argparse

from rich.console import Console

from chipfuse.cluster.builtin import default_pool
from chipfuse.cluster.catalog import GiB
from chipfuse.cluster.pool import Device, Pool, load_pool
from chipfuse.errors import ChipfuseError
from chipfuse.model.spec import resolve_model
from chipfuse.plan.cost import predict
from chipfuse.plan.islands import best_with_islands
from chipfuse.plan.plan import DTYPES, OPTIMIZER_DTYPES, SCHEDULES, Plan
from chipfuse.plan.profile import Profile
from chipfuse.plan.search import SearchResult, search
from chipfuse.report.output import console, table, write_json

# The plan table has nine columns: never squeeze it below 130 characters (a pipe gets 80 by default).
wide = Console(highlight=False, width=max(console.width, 130))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search the best plan for a pool and a model (no devices needed)")
    p.add_argument("--pool", required=True, help="pool TOML file (see examples/), or 'builtin' (the emulated 4:2:1 pool)")
    p.add_argument("--model", help="model preset or Hugging Face config.json")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step")
    p.add_argument("--seq-len", type=int, help="tokens per sample")
    p.add_argument("--evaluate", metavar="PLAN_JSON",
                   help="no search: predict (and --timeline: simulate) this plan, e.g. a hand-written one")
    p.add_argument("--time-budget", type=float, default=5.0, help="seconds the search may take (default 5)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--optimizer-dtype", choices=OPTIMIZER_DTYPES, default="fp32")
    p.add_argument("--schedule", choices=[s for s in SCHEDULES if s != "interleaved"], default="1f1b")
    p.add_argument("--profile", help="measured profile JSON (from `chipfuse profile`) overriding catalog figures")
    p.add_argument("--json", metavar="PATH", help="write plan, prediction and baselines (read by `chipfuse train --plan`)")
    p.add_argument("--timeline", metavar="PNG", help="draw the simulated step of the chosen plan")
    p.add_argument("--max-model", action="store_true",
                   help="no search: the largest model of --model's family (same depth, wider) the pool can train "
                        "under each memory strategy, and what limits it")
    p.add_argument("--micro-batch", type=int, default=1, help="with --max-model: samples per device (default 1)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    pool = default_pool() if args.pool == "builtin" else load_pool(args.pool)
    if args.max_model:
        return _max_model(args, pool)
    profile = Profile.load(args.profile) if args.profile else None
    source = "profile " + args.profile if args.profile else "catalog peak x default efficiency"
    if args.evaluate:
        plan = Plan.from_json(args.evaluate)
        plan.check_against_pool(pool, source=args.evaluate)
        pred = predict(plan, pool, profile)
        wide.print(plan_table(plan, pool, pred.memory_bytes))
        out: dict = {"plan": plan.to_dict(), "predicted": pred.to_dict()}
        console.print(f"predicted step {pred.step_s:.3g} s, {pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%}"
                      + ("" if pred.fits else f"; does NOT fit: over capacity on {sorted(pred.breakdown['over_capacity'])}"))
    else:
        for flag, val in (("--model", args.model), ("--global-batch", args.global_batch), ("--seq-len", args.seq_len)):
            if val is None:
                raise ChipfuseError(f"chipfuse plan: {flag} is missing. Fix: give {flag} (or --evaluate PLAN_JSON)")
        res = search(pool, resolve_model(args.model), global_batch=args.global_batch, seq_len=args.seq_len,
                     time_budget_s=args.time_budget, profile=profile, dtype=args.dtype,
                     optimizer_dtype=args.optimizer_dtype, schedule=args.schedule)
        # Slow links (docs/slow_links.md): DiLoCo islands and H when a link is too slow for sync training.
        res, advice = best_with_islands(res, pool, profile)
        plan, pred = res.plan, res.prediction
        wide.print(plan_table(plan, pool, pred.memory_bytes))
        wide.print(strategy_table(res))
        out = res.to_dict()
        out["sync_advice"] = advice.to_dict()
        if advice.sync.islands:
            console.print(f"slow link: {advice.reason}; predicted {advice.predicted_speedup:.2f}x over synchronous "
                          "(the chipfuse row is the islands plan; the simple strategies' rows are synchronous)")
    b = pred.breakdown
    console.print(f"step: slowest replica's pipeline {b['pipeline_s']:.3g} s (bubble {b['bubble_fraction']:.0%}), "
                  f"then {b['sync_exposed_s']:.3g} s of gradient sync and optimizer not hidden behind it")
    out["emulated"] = pool.emulated
    out["predicted_from"] = source
    if args.timeline:
        from chipfuse.report.timeline import save_timeline
        from chipfuse.sim.pipeline import simulate

        sim = simulate(plan, pool, profile)
        rows = save_timeline(sim, args.timeline,
                             title=f"{plan.model.name} on {pool.name}: simulated step {sim.step_s:.3g} s")
        out["simulated_step_s"] = sim.step_s
        console.print(f"timeline of the simulated step ({sim.step_s:.3g} s, {rows} rows) written to {args.timeline}")
    if not args.evaluate:
        console.print(f"searched {res.candidates} candidate plans in {res.search_s:.2f} s")
        for n in res.notes:
            console.print(f"note: {n}")
    console.print(f"predictions from {source}" + ("; the pool is EMULATED: figures describe the emulation"
                                                 if pool.emulated else ""))
    write_json(args.json, out)
    return 0


def _group_rows(plan: Plan, pool: Pool, mem: dict[str, int]) -> list[list]:
    """One row per stage; identical replicas (same chips, split and share) folded into one."""
    dev = {d.name: d for d in pool.devices}
    folds: dict[tuple, list[int]] = {}
    for i, r in enumerate(plan.replicas):
        key = (r.batch_share, r.micro_batch_size,
               tuple((_chip(dev[s.devices[0]]), len(s.devices), s.num_layers, s.tp_degree, s.checkpoint, s.shard,
                      s.offload) for s in r.stages))
        folds.setdefault(key, []).append(i)
    rows = []
    for idxs in folds.values():
        r = plan.replicas[idxs[0]]
        label = f"{idxs[0]}" if len(idxs) == 1 else f"{idxs[0]}.. (x{len(idxs)})"
        for j, s in enumerate(r.stages):
            chip = _chip(dev[s.devices[0]])
            peak = max(mem.get(d, 0) for d in s.devices)
            cap = dev[s.devices[0]].memory_bytes
            memstr = " ".join(x for x in (s.checkpoint != "none" and f"ckpt:{s.checkpoint}",
                                          s.shard != "none" and f"shard:{s.shard}",
                                          s.offload != "none" and f"offload:{s.offload}") if x) or "-"
            rows.append([label if j == 0 else "", j, f"{len(s.devices)} x {chip}",
                         f"{s.first_layer}-{s.first_layer + s.num_layers - 1}", s.tp_degree,
                         r.batch_share if j == 0 else "", f"{r.num_micro_batches} x {r.micro_batch_size}" if j == 0 else "",
                         memstr, f"{peak / GiB:.1f}/{cap / GiB:.0f}"])
    return rows


def _chip(d: Device) -> str:
    return f"{d.chip.name} (emulated x{d.emulation.speed:g})" if d.emulation else d.chip.name


def plan_table(plan: Plan, pool: Pool, memory_bytes: dict[str, int]):
    used = len(plan.devices)
    title = (f"plan for {plan.model.name} on {pool.name}: {len(plan.replicas)} replicas over {used} devices"
             + (f", {len(plan.excluded)} left out" if plan.excluded else ""))
    return table(title, ["replica", "stage", "devices", "layers", "tp", "share", "mb x size", "memory strategy",
                         "GiB used/has"], _group_rows(plan, pool, memory_bytes))


def strategy_table(res: SearchResult):
    ours = res.prediction
    rows = [["chipfuse", len(res.plan.devices), f"{ours.step_s:.3g}", f"{ours.tokens_per_s:,.0f}", f"{ours.mfu:.1%}",
             "yes", "1.00"]]
    for name, s in res.baselines.items():
        if s is None:
            rows.append([name, "-", "-", "-", "-", "no plan", "-"])
            continue
        p = s.prediction
        rows.append([name, len(s.plan.devices), f"{p.step_s:.3g}", f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}",
                     "yes" if p.fits else "NO", f"{ours.tokens_per_s / p.tokens_per_s:.2f}"])
    return table("predicted step, chipfuse's plan beside each simple strategy (x: chipfuse's tokens/s / its)",
                 ["strategy", "devices", "step s", "tokens/s", "MFU", "fits", "x"], rows)


def _max_model(args: argparse.Namespace, pool: Pool) -> int:
    from dataclasses import replace

    from chipfuse.plan.max_model import report

    if args.model is None:
        raise ChipfuseError("chipfuse plan --max-model: --model is missing. Fix: give the family's base model")
    base = resolve_model(args.model)
    base = replace(base, seq_len=args.seq_len or base.seq_len)
    write_json(args.json, report(pool, base, micro_batch_size=args.micro_batch, dtype=args.dtype))
    return 0
