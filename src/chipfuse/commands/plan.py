"""`chipfuse plan`: search a plan for a pool and a model, show it beside the simple strategies."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from chipfuse.cluster.builtin import default_pool
from chipfuse.cluster.catalog import GiB
from chipfuse.cluster.pool import Device, Pool, load_pool
from chipfuse.errors import ChipfuseError
from chipfuse.model.configs import resolve_model
from chipfuse.model.converters.freeze import FREEZE_HELP, with_freeze
from chipfuse.plan.cost import predict
from chipfuse.plan.kernels import expected_error
from chipfuse.plan.offers import SYNC_MODES, dtype_notes, offers
from chipfuse.plan.plan import DTYPES, OPTIMIZER_DTYPES, SCHEDULES, Plan
from chipfuse.plan.profile import Profile
from chipfuse.plan.search import SearchResult, search
from chipfuse.report.output import console, table, write_json
from chipfuse.validate import arg_float, arg_int

# The plan table has nine columns: never squeeze it below 130 characters (a pipe gets 80 by default).
wide = Console(highlight=False, width=max(console.width, 130))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search the best plan for a pool and a model (no devices needed)")
    p.add_argument("--pool", required=True, help="pool TOML file (see examples/), or 'builtin' (the emulated 4:2:1 pool)")
    p.add_argument("--model", help="model preset or Hugging Face config.json")
    p.add_argument("--global-batch", type=arg_int(1, 1 << 20), help="samples per optimizer step")
    p.add_argument("--seq-len", type=arg_int(1, 1 << 20), help="tokens per sample")
    p.add_argument("--evaluate", metavar="PLAN_JSON",
                   help="no search: predict (and --timeline: simulate) this plan, e.g. a hand-written one")
    p.add_argument("--time-budget", type=arg_float(0, 3600, above=True), default=5.0, help="seconds the search may take (default 5)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="compute dtype (default bf16; chips without bf16 compute a bf16 plan in fp32, and the plan "
                        "says so; fp16 is predicted but not yet run by chipfuse train)")
    p.add_argument("--sync", choices=SYNC_MODES, default="sync",
                   help="sync (default): the best synchronous plan, with islands and other changes to what is "
                        "learned only offered; islands: run as DiLoCo islands when the links call for them; "
                        "auto: islands when they predict more tokens/s")
    p.add_argument("--optimizer-dtype", choices=OPTIMIZER_DTYPES, default="fp32")
    p.add_argument("--schedule", choices=[s for s in SCHEDULES if s != "interleaved"], default="1f1b")
    p.add_argument("--freeze", metavar="UNITS", help=FREEZE_HELP)
    p.add_argument("--profile", help="measured profile JSON (from `chipfuse profile`) overriding catalog figures")
    p.add_argument("--json", metavar="PATH", help="write plan, prediction and baselines (read by `chipfuse train --plan`)")
    p.add_argument("--timeline", metavar="PNG", help="draw the simulated step of the chosen plan")
    p.add_argument("--max-model", action="store_true",
                   help="no search: the largest model of --model's family (same depth, wider) the pool can train "
                        "under each memory strategy, and what limits it")
    p.add_argument("--micro-batch", type=arg_int(1, 1 << 20), default=1, help="with --max-model: samples per device (default 1)")
    p.add_argument("--serve", action="store_true", help="plan inference instead (which devices hold which layers at "
                   "what precision), beside the even and memory-proportional splits")
    p.add_argument("--context-len", type=arg_int(1, 1 << 24), help="with --serve: tokens per request (default: --seq-len or the model's)")
    p.add_argument("--concurrency", type=arg_int(1, 1 << 16), default=1, help="with --serve: requests in flight (default 1)")
    p.add_argument("--quantize", choices=["when-needed", "allowed"], default="when-needed",
                   help="with --serve: int8/int4 weights only where memory forces them (default), or wherever faster")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()  # every second the command spends counts in what it reports
    pool = default_pool() if args.pool == "builtin" else load_pool(args.pool)
    if args.serve:
        from chipfuse.commands.serve import cmd_plan_serve

        return cmd_plan_serve(args, pool)
    if args.max_model:
        return _max_model(args, pool)
    profile = Profile.load(args.profile) if args.profile else None
    source = "profile " + args.profile if args.profile else "catalog peaks through the calibrated kernel model"
    if args.evaluate:
        plan = with_freeze(Plan.from_json(args.evaluate), args.freeze)
        plan.check_against_pool(pool, source=args.evaluate)
        pred = predict(plan, pool, profile)
        wide.print(plan_table(plan, pool, pred.memory_bytes))
        out: dict = {"plan": plan.to_dict(), "predicted": pred.to_dict()}
        console.print(f"predicted step {pred.step_s:.3g} s{_band(pool, profile)}, {pred.tokens_per_s:,.0f} tokens/s, "
                      f"MFU {pred.mfu:.1%}"
                      + ("" if pred.fits else f"; does NOT fit: over capacity on {sorted(pred.breakdown['over_capacity'])}"))
    else:
        for flag, val in (("--model", args.model), ("--global-batch", args.global_batch), ("--seq-len", args.seq_len)):
            if val is None:
                raise ChipfuseError(f"chipfuse plan: {flag} is missing. Fix: give {flag} (or --evaluate PLAN_JSON)")
        res = search(pool, resolve_model(args.model), global_batch=args.global_batch, seq_len=args.seq_len,
                     time_budget_s=args.time_budget, profile=profile, dtype=args.dtype,
                     optimizer_dtype=args.optimizer_dtype, schedule=args.schedule)
        if args.freeze is not None:  # the search prices every unit trainable (an upper bound); re-price the choice
            frozen = with_freeze(res.plan, args.freeze)
            res = replace(res, plan=frozen, prediction=predict(frozen, pool, profile))
        # Changes to what is learned (DiLoCo islands over slow links, low-bit optimizer state, fp16) are
        # offered beside the synchronous plan and applied only when asked (plan.offers).
        res, offered, advice = offers(res, pool, profile, sync=args.sync)
        plan, pred = res.plan, res.prediction
        wide.print(plan_table(plan, pool, pred.memory_bytes))
        wide.print(strategy_table(res))
        out = res.to_dict()
        out["sync_advice"] = advice.to_dict()
        out["offers"] = [o.to_dict() for o in offered]
        console.print(f"predicted step {pred.step_s:.3g} s{_band(pool, profile)}, {pred.tokens_per_s:,.0f} tokens/s, "
                      f"MFU {pred.mfu:.1%}" + (" (DiLoCo islands, applied by --sync)" if plan.sync.islands else ""))
        for n in dtype_notes(plan, pool):
            console.print(f"note: {n}")
        for o in offered:
            gib = f", {o.memory_saved_bytes / GiB:.1f} GiB less per device" if o.memory_saved_bytes > 0 else ""
            console.print(f"{'applied' if o.applied else 'offered'}: {o.name}: {o.speedup:.2f}x predicted{gib}; "
                          f"changes {o.changes}; expected loss cost: {o.loss_cost}"
                          + ("" if o.applied else f"; apply with {o.apply}"))
    b = pred.breakdown
    console.print(f"step: slowest replica's pipeline {b['pipeline_s']:.3g} s (bubble {b['bubble_fraction']:.0%}), "
                  f"then {b['sync_exposed_s']:.3g} s of gradient sync and optimizer not hidden behind it")
    out["emulated"] = pool.emulated
    out["predicted_from"] = source
    out["expected_error"] = _error(pool, profile)
    if args.timeline:
        from chipfuse.report.timeline import save_timeline
        from chipfuse.sim.pipeline import simulate

        sim = simulate(plan, pool, profile)
        rows = save_timeline(sim, args.timeline,
                             title=f"{plan.model.name} on {pool.name}: simulated step {sim.step_s:.3g} s")
        out["simulated_step_s"] = sim.step_s
        console.print(f"timeline of the simulated step ({sim.step_s:.3g} s, {rows} rows) written to {args.timeline}")
    if not args.evaluate:
        took = time.perf_counter() - t0
        since_start = _process_s()
        out["command_s"] = took
        out["process_s"] = since_start
        console.print(f"searched {res.candidates} candidate plans in {took:.2f} s (search {res.search_s:.2f} s, "
                      "the rest: island advice, offers, output)"
                      + (f"; {since_start:.1f} s since the process started (Python and imports included)"
                         if since_start is not None else ""))
        for n in res.notes:
            console.print(f"note: {n}")
    console.print(f"predictions from {source}" + ("; the pool is EMULATED: figures describe the emulation"
                                                 if pool.emulated else ""))
    write_json(args.json, out)
    return 0


def _process_s() -> float | None:
    """Seconds since this process started (Linux /proc), so that the time reported covers start-up too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _error(pool: Pool, profile: Profile | None) -> dict:
    """The expected error band of a prediction: held-out errors on published runs (plan.kernels)."""
    err = expected_error()
    if not err:
        return {}
    return {**err, "applies": not pool.emulated and profile is None,
            "why_not": "" if not pool.emulated and profile is None else
            "measured on real chips from catalog figures; emulated pools and profiles are checked by "
            "benchmarks/calibration.py (docs/emulation.md)"}


def _band(pool: Pool, profile: Profile | None) -> str:
    err = _error(pool, profile)
    if not err or "time_mape_heldout" not in err:
        return ""
    tail = "" if err["applies"] else ", measured on real chips"
    return f" (expected error +/-{err['time_mape_heldout']:.0%}: held-out MAPE on published runs{tail})"


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
                         memstr, f"{peak / GiB:.1f}/{cap / GiB:.0f}" if cap >= GiB
                         else f"{peak / 2**20:.1f}/{cap / 2**20:.1f} MiB"])
    return rows


def _chip(d: Device) -> str:
    return f"{d.chip.name} (emulated x{d.emulation.speed:g})" if d.emulation else d.chip.name


def plan_table(plan: Plan, pool: Pool, memory_bytes: dict[str, int]):
    used = len(plan.devices)
    title = (f"plan for {plan.model.name} on {pool.name}: {len(plan.replicas)} replicas over {used} devices"
             + (f", {len(plan.excluded)} left out" if plan.excluded else ""))
    return table(title, ["replica", "stage", "devices", "layers", "tp", "share", "mb x size", "memory strategy",
                         "GiB used/has"], _group_rows(plan, pool, memory_bytes))  # MiB below one GiB


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

    from chipfuse.plan.max_model import report

    if args.model is None:
        raise ChipfuseError("chipfuse plan --max-model: --model is missing. Fix: give the family's base model")
    base = resolve_model(args.model)
    base = replace(base, seq_len=args.seq_len or base.seq_len)
    write_json(args.json, report(pool, base, micro_batch_size=args.micro_batch, dtype=args.dtype))
    return 0
