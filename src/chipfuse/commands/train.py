"""`chipfuse train`: the main job. Without torchrun it resolves the run once (plan, checks, every
worker's settings) into RUN_DIR/runspec.json and launches workers that load that file
(runtime/launch/worker.py), then writes the summary once; under the user's own torchrun (RANK set,
several hosts) each worker resolves the same flags itself. Same flags either way."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from chipfuse.cluster.builtin import default_pool
from chipfuse.cluster.pool import Pool, load_pool
from chipfuse.commands import data_flags, endure_flags
from chipfuse.errors import ChipfuseError
from chipfuse.model.configs import resolve_model
from chipfuse.model.converters.freeze import FREEZE_HELP
from chipfuse.plan.plan import Plan
from chipfuse.report.output import console, table
from chipfuse.runtime.launch.dist import launched_by_torchrun
from chipfuse.runtime.launch.runspec import BUILTIN_POOL, RunSpec
from chipfuse.runtime.train.trainer import TrainConfig
from chipfuse.validate import arg_float, arg_int

BUILTIN = BUILTIN_POOL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a pool (default: a built-in emulated 4:2:1 pool)")
    p.add_argument("--pool", default=BUILTIN, help="pool TOML file (default: built-in emulated pool)")
    p.add_argument("--plan", help="plan JSON (from `chipfuse plan --json`); default: unequal data parallel")
    p.add_argument("--model", default="small", help="model preset, Hugging Face config.json or model folder "
                   "(default: small; the --init-from folder when that is given)")
    p.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face model folder's weights (config.json "
                   "+ safetensors): each rank loads only its own tensors")
    p.add_argument("--steps", type=arg_int(1, 10**7), default=60)
    p.add_argument("--global-batch", type=arg_int(1, 1 << 20), default=56)
    p.add_argument("--seq-len", type=arg_int(1, 1 << 20), default=None, help="default: the model's context length")
    p.add_argument("--micro-batch", type=arg_int(1, 1 << 20), default=8, help="preferred micro-batch size (memory may lower it)")
    p.add_argument("--even", action="store_true", help="split the batch evenly (the simple baseline)")
    p.add_argument("--shares", choices=["plan", "measured"], default=None,
                   help="'measured': re-split by speeds measured in a warm-up (default for real devices)")
    p.add_argument("--lr", type=arg_float(0, 1e32), default=3e-3)
    p.add_argument("--seed", type=arg_int(0, 2**32 - 1), default=0)
    p.add_argument("--solo-samples", type=arg_int(0, 1 << 16), default=16,
                   help="samples each device runs alone at start, for fusion efficiency (0: skip)")
    p.add_argument("--run-dir", default=None, help="where the plan, metrics and summary go (default: runs/<time>)")
    p.add_argument("--metrics", default=None, help="per-step JSON lines (default: RUN_DIR/metrics.jsonl)")
    p.add_argument("--json", metavar="PATH", help="write the run's summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", help="measured profile (from `chipfuse profile`) for the predicted step time")
    p.add_argument("--timeline", metavar="PNG", help="draw the measured step beside the simulator's prediction")
    p.add_argument("--pool-node", help="under torchrun on several hosts: this host's node in the pool; its "
                   "workers take that node's plan devices by local rank")
    p.add_argument("--freeze", metavar="UNITS", help=FREEZE_HELP)
    p.add_argument("--dry-run", action="store_true", help="write RUN_DIR/plan.json and stop (for multi-host launches)")
    endure_flags.add_arguments(p)
    data_flags.add_arguments(p)  # --data, validation, lr schedule, clipping, weight decay
    p.set_defaults(func=cmd_train)


def _load_pool(arg: str) -> Pool:
    return default_pool() if arg == BUILTIN else load_pool(arg)


def make_plan(args: argparse.Namespace, pool: Pool) -> Plan:
    """The plan from --plan (refused here if it does not match the pool or does not fit its memory),
    or unequal data parallelism over the pool; with --freeze's units frozen."""
    from chipfuse.model.converters.freeze import with_freeze

    return with_freeze(_base_plan(args, pool), getattr(args, "freeze", None))


def _base_plan(args: argparse.Namespace, pool: Pool) -> Plan:
    if args.plan:
        from chipfuse.plan.memory import check_plan_memory

        plan = Plan.from_json(args.plan)
        plan.check_against_pool(pool, source=args.plan)
        check_plan_memory(plan, pool, source=args.plan)  # predicted peak per device, before any worker starts
        return plan
    from chipfuse.plan.data_parallel import unequal_data_parallel

    spec = getattr(args, "model_spec", None) or resolve_model(args.model)  # a resumed run: the checkpoint's
    seq_len = args.seq_len or spec.seq_len
    if seq_len > spec.seq_len:
        raise ChipfuseError(f"--seq-len {seq_len} is longer than model {spec.name!r} allows ({spec.seq_len}). "
                            "Fix: lower --seq-len")
    # Sized by the planner's memory model at --seq-len: no model is built before the workers start.
    return unequal_data_parallel(pool, spec, global_batch=args.global_batch, seq_len=seq_len,
                                 preferred_micro_batch=args.micro_batch, even=args.even)


def resolve(args: argparse.Namespace, pool: Pool) -> RunSpec:
    """The run, resolved once from the flags and the pool: the plan (made or read, and checked once),
    the data and the initial weights refused before any worker starts, and every worker's settings."""
    from chipfuse.runtime.launch.dist import host_devices
    from chipfuse.runtime.parallel.topology import check_runnable

    plan = endure_flags.prepare(args, pool, make_plan)
    # The one check: everything about the plan against the runtime and this host's chips. Workers
    # only check their ranks (Topology.check_ranks).
    check_runnable(plan, pool, source=args.plan or "<plan>", host_devices=host_devices())
    data_flags.check(args, plan)  # bad data or recipe: one line, before any worker starts
    if args.init_from:  # every tensor checked from the headers before any worker starts
        from chipfuse.model.export import check_init_from

        check_init_from(plan.model, args.init_from)
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    shares = args.shares or ("plan" if all(d.emulated for d in pool.devices) else "measured")
    data, recipe = data_flags.config(args)
    train = TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, shares=shares, solo_samples=args.solo_samples,
                        metrics_path=args.metrics or str(run_dir / "metrics.jsonl"), progress=not args.no_progress,
                        device=_node_device(args.pool_node, plan, pool) if args.pool_node else None,
                        endure=endure_flags.config(args), profile_path=args.profile, data=data, recipe=recipe,
                        init_from=args.init_from)
    return RunSpec(plan=plan, pool_source=args.pool, exclude=endure_flags.excluded(args), train=train,
                   run_dir=str(run_dir), summary_path=args.json or str(run_dir / "summary.json"),
                   timeline_path=args.timeline)


def cmd_train(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ChipfuseError(f"--steps is {args.steps}. Fix: train at least one step (use --dry-run to only plan)")
    pool = endure_flags.exclude(args, _load_pool(args.pool))
    if args.init_from and args.model == "small":  # the folder is the model unless --model says otherwise
        args.model = args.init_from
    if launched_by_torchrun():  # started by the user's torchrun (several hosts): each worker is its own launcher
        return _torchrun_worker(resolve(args, pool))
    spec = resolve(args, pool)
    plan = spec.plan
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    plan_path = Path(spec.run_dir) / "plan.json"
    plan.to_json(plan_path)
    if args.dry_run:
        console.print(f"plan written to {plan_path} ({len(plan.devices)} devices, strategy {plan.strategy})")
        return 0
    if pool.emulated:
        console.print(f"[bold]pool {pool.name}[/]: {len(plan.devices)} EMULATED devices on this machine "
                      "(relative speeds and memory caps, see docs/emulation.md)")
    if args.profile is None and plan.is_pure_data_parallel and all(d.emulated for d in pool.devices):
        profile = _emulation_profile(args, plan, pool, Path(spec.run_dir))
        spec = replace(spec, train=replace(spec.train, profile_path=str(profile)))
    spec_path = spec.save()  # every worker of every launch path loads this one file
    extra: dict = {}
    if len(plan.devices) == 1:
        rc = _in_process(spec)
    elif endure_flags.supervised(args):
        rc, extra = endure_flags.launch(args, spec, pool=pool)
    else:
        rc = launch_local(len(plan.devices), spec_path)
    if rc != 0:
        console.print(f"[red]training failed (exit {rc})[/]; the plan is in {plan_path}")
        return rc
    write_summary(spec, json.loads(spec.result_path.read_text()) | extra, pool=pool)
    return 0


def write_summary(spec: RunSpec, raw: dict, *, pool: Pool) -> dict:
    """The one summary writer: rank 0's summary plus what the launcher knows (lost devices, the
    prediction), written once to the --json file and printed once."""
    from chipfuse.report.measured import finish_run, prediction_line

    summary = finish_run(spec.plan, pool, raw, summary_path=spec.summary_path, profile_path=spec.train.profile_path,
                         timeline_path=spec.timeline_path, metrics_path=spec.train.metrics_path)
    print_summary(summary)
    if summary.get("final_val_loss") is not None:
        console.print(f"validation: loss {summary['final_val_loss']:.3f}, perplexity {summary['final_val_ppl']:.1f} "
                      f"({summary['validation']['tokens']} held-out tokens)")
    console.print(prediction_line(summary))
    if spec.timeline_path:
        console.print(f"timeline (measured beside predicted): {spec.timeline_path}")
    return summary


def _in_process(spec: RunSpec) -> int:
    """One device: the worker runs in this process, as a job of one rank."""
    from chipfuse.runtime.launch.worker import run_worker

    env_backup = dict(os.environ)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    try:
        run_worker(spec)
    finally:
        from chipfuse.runtime.launch import dist as cfdist

        cfdist.shutdown()
        os.environ.clear()
        os.environ.update(env_backup)
    return 0


def _torchrun_worker(spec: RunSpec) -> int:
    from chipfuse.runtime.launch import dist as cfdist
    from chipfuse.runtime.launch.worker import run_worker

    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)  # each host's own: metrics and the summary go there
    raw = run_worker(spec)
    if raw is not None:
        write_summary(spec, raw, pool=spec.pool())
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        cfdist.shutdown(exit_code=0)
    cfdist.shutdown()
    return 0


def _emulation_profile(args: argparse.Namespace, plan: Plan, pool: Pool, run_dir: Path) -> Path:
    """Measure this host's thread once; the workers pace to it and the prediction uses it, so an
    emulated run is predicted for the chip it emulates, not for the catalog chip it is named after."""
    from chipfuse.plan.profile import emulation_profile
    from chipfuse.runtime.measure.probe import measure_unit_s

    unit_s = args.unit_s or measure_unit_s(plan.model, seq_len=plan.seq_len,
                                           micro_batch=max(r.micro_batch_size for r in plan.replicas))
    path = run_dir / "emulation_profile.json"
    emulation_profile(plan, pool, unit_s=unit_s).save(path)
    return path


def launch_local(nproc: int, spec_path: Path) -> int:
    """Start `nproc` workers on this machine with torchrun (one thread each), each loading the spec."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Rank 0 speaks for the job on stdout; every rank keeps its stderr, where its one-line error goes.
    quiet = ",".join(f"{i}:1" for i in range(1, nproc)) or "0:0"
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "chipfuse.runtime.launch.torchrun", "--standalone", f"--nproc-per-node={nproc}",
               "--log-dir", logs, "--redirects", quiet, "-m", "chipfuse.runtime.launch.worker", str(spec_path)]
        return subprocess.call(cmd, env=env)


def _node_device(node: str, plan: Plan, pool: Pool) -> str:
    names = [d.name for n in pool.nodes if n.name == node for d in n.devices if d.name in plan.devices]
    if not any(n.name == node for n in pool.nodes):
        raise ChipfuseError(f"--pool-node {node!r} is not a node of pool {pool.name!r}. "
                            f"Fix: use one of {[n.name for n in pool.nodes]}")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= len(names):
        raise ChipfuseError(f"node {node!r} has {len(names)} plan devices but local rank {local} started. "
                            f"Fix: --nproc-per-node {len(names)} on this host")
    return names[local]


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_summary(s: dict) -> None:
    label = " (EMULATED devices)" if s["emulated"] else ""
    rows = [[d, v["chip"], f"x{v['speed']:g}" if v["speed"] else "real", s["shares"].get(d, "-"),
             s["micro_batch_size"].get(d, "-"), _opt(s['solo_tokens_per_s'][d]), f"{v['tokens_per_s']:.0f}",
             f"{v['wait_s_mean'] * 1e3:.0f}"] for d, v in s["devices"].items()]
    console.print(table(f"devices{label}", ["device", "chip", "speed", "share", "micro-batch", "alone tok/s",
                                            "in job tok/s", "wait ms/step"], rows))
    eff = s["fusion_efficiency"]
    console.print(
        f"[bold]{s['model']}[/] ({s['num_params'] / 1e6:.2f}M params), {s['steps']} steps of {s['global_batch']} x "
        f"{s['seq_len']} tokens: loss {s['initial_loss']:.3f} -> {s['final_loss']:.3f}; "
        f"{s['tokens_per_s']:.0f} tok/s{label}; fusion efficiency "
        + (f"{eff:.2f}" if eff is not None else f"n/a ({s.get('fusion_efficiency_fault', 'not measured')})")
        + " (job / sum of each device alone)"
    )
