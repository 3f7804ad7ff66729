"""`chipfuse train` flags for enduring failures, and what the launcher does with them.

Kept out of commands/train.py so that the train command only calls: `add_arguments`, `prepare`
(exclusions, the plan a resumed run continues with, refusals before any worker starts),
`config` (the workers' EndureConfig), `worker_args` and `launch` (the supervisor)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from chipfuse.cluster.pool import Pool
from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.endure.endure import EndureConfig
from chipfuse.runtime.endure.guard import NAN_POLICIES
from chipfuse.validate import arg_float, arg_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("enduring failures (docs/endure.md)")
    g.add_argument("--checkpoint-dir", help="write checkpoints here (DIR/step_NNNNNN/), and survive a lost device")
    g.add_argument("--checkpoint-every", type=arg_int(0, 10**7), default=0, metavar="STEPS",
                   help="steps between checkpoints (default 0: only on a clean stop and at the end)")
    g.add_argument("--checkpoint-keep", type=arg_int(1, 1000), default=3, metavar="K", help="complete checkpoints kept")
    g.add_argument("--resume", metavar="DIR", help="continue from the newest good checkpoint in DIR (re-planned "
                   "over the pool when its devices changed)")
    g.add_argument("--exclude", default="", metavar="DEV[,DEV]", help="leave these pool devices out (lost ones)")
    g.add_argument("--nan-policy", choices=NAN_POLICIES, default="skip",
                   help="a NaN/inf loss: skip the update and report (default), or stop")
    g.add_argument("--no-rebalance", action="store_true", help="keep the shares fixed when a device slows down")
    g.add_argument("--on-device-loss", choices=["restart", "stop"], default="restart",
                   help="a worker dies: restart on the survivors from the last checkpoint, or stop and say how "
                   "to resume (needs --checkpoint-dir)")
    g.add_argument("--slowdown", default="", metavar="DEV@STEP:FACTOR",
                   help="emulation: multiply DEV's speed by FACTOR from step STEP (a straggler)")
    g.add_argument("--unit-s", type=arg_float(0, 60, above=True), default=None, metavar="SECONDS",
                   help="emulation: seconds per sample of an unslowed worker (default: measured at start-up); "
                   "the same value makes runs comparable on a busy machine")


def exclude(args: argparse.Namespace, pool: Pool) -> Pool:
    names = [n for n in args.exclude.split(",") if n]
    if not names:
        return pool
    known = {d.name for d in pool.devices}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ChipfuseError(f"--exclude {unknown[0]!r}: not a device of pool {pool.name!r}. Fix: use some of "
                            f"{sorted(known)}")
    left = [d.name for d in pool.devices if d.name not in names]
    if not left:
        raise ChipfuseError("--exclude leaves no device. Fix: exclude fewer devices")
    return pool.subset(left)


def prepare(args: argparse.Namespace, pool: Pool, make_plan: Callable[[argparse.Namespace, Pool], Plan]) -> Plan:
    """The plan to run: from --plan, the checkpoint's own plan when its devices are all still here, or
    a new one over the pool with the checkpoint's model, batch and sequence (the samples of a step
    depend on those alone). Refuses a fresh run into a directory that already holds checkpoints."""
    if args.checkpoint_every < 0 or args.checkpoint_keep < 1:
        raise ChipfuseError("--checkpoint-every must be >= 0 and --checkpoint-keep >= 1. Fix: correct them")
    if args.checkpoint_every and not args.checkpoint_dir and not args.resume:
        raise ChipfuseError("--checkpoint-every needs a --checkpoint-dir. Fix: add --checkpoint-dir DIR")
    if args.resume and not args.checkpoint_dir:
        args.checkpoint_dir = str(_root(args.resume))
    if not args.resume:
        if args.checkpoint_dir and checkpoint.complete_steps(args.checkpoint_dir):
            raise ChipfuseError(f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints of another run. "
                                f"Fix: add --resume {args.checkpoint_dir} to continue it, or use an empty directory")
        return make_plan(args, pool)
    _, manifest, _ = checkpoint.find_latest(args.resume)
    saved = Plan.from_dict(manifest["plan"], source=f"{args.resume} (manifest plan)")
    if args.plan:
        plan = make_plan(args, pool)
    elif set(saved.devices) <= {d.name for d in pool.devices}:
        plan = saved
    else:
        args.model_spec, args.global_batch, args.seq_len = saved.model, saved.global_batch, saved.seq_len
        if getattr(args, "freeze", None) is None and saved.freeze:  # the optimizer state holds only what trained
            args.freeze = ",".join(saved.freeze)
        plan = make_plan(args, pool)
    checkpoint.check_resumable(manifest["plan"], plan, args.resume)
    return plan


def _root(path: str) -> Path:
    p = Path(path)
    return p.parent if (p / checkpoint.MANIFEST).exists() else p


def config(args: argparse.Namespace) -> EndureConfig:
    return EndureConfig(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                        checkpoint_keep=args.checkpoint_keep, resume=args.resume, nan_policy=args.nan_policy,
                        rebalance=not args.no_rebalance, slowdown=args.slowdown)


def worker_args(args: argparse.Namespace) -> list[str]:
    """The flags the workers need (--resume is added per launch by the supervisor)."""
    out = ["--nan-policy", args.nan_policy, "--checkpoint-every", str(args.checkpoint_every),
           "--checkpoint-keep", str(args.checkpoint_keep)]
    if args.checkpoint_dir:
        out += ["--checkpoint-dir", args.checkpoint_dir]
    if args.no_rebalance:
        out.append("--no-rebalance")
    if args.slowdown:
        out += ["--slowdown", args.slowdown]
    if args.unit_s:
        out += ["--unit-s", str(args.unit_s)]
    return out


def supervised(args: argparse.Namespace) -> bool:
    """Launch under chipfuse's supervisor (survives a lost device) rather than plain torchrun."""
    return bool(args.checkpoint_dir)


def launch(args: argparse.Namespace, plan: Plan, worker_argv: list[str], summary_path: Path, *, pool: Pool,
           make_plan: Callable[[argparse.Namespace, Pool], Plan]) -> int:
    """Run the workers under the supervisor; add what died and the restarts to the run summary.

    After a death, a data-parallel plan keeps its survivors' shares (in proportion); any other plan
    (pipelines) is re-planned as `chipfuse train` would plan the survivors, with the same model,
    batch, sequence and frozen units."""
    from chipfuse.runtime.launch.supervisor import supervise, survivor_plan

    def replan(old: Plan, dead: set[str]) -> Plan:
        if old.is_pure_data_parallel:
            return survivor_plan(old, dead)
        again = argparse.Namespace(**{**vars(args), "plan": None, "model_spec": old.model,
                                      "global_batch": old.global_batch, "seq_len": old.seq_len,
                                      "freeze": ",".join(old.freeze) or None})
        return make_plan(again, pool.subset([d for d in old.devices if d not in dead]))

    def make_argv(plan_path: Path, resume: str | None) -> list[str]:
        argv = list(worker_argv)
        argv[argv.index("--plan") + 1] = str(plan_path)
        return [sys.executable, "-m", "chipfuse.cli", *argv, *(["--resume", resume] if resume else [])]

    outcome = supervise(plan, make_argv, checkpoint_dir=args.checkpoint_dir, resume_from=args.resume,
                        policy=args.on_device_loss, replan=replan,
                        env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        s["device_losses"] = [{"device": d.device, "rank": d.rank, "how": d.how, "detected_unix_s": d.detected_unix_s}
                              for d in outcome.deaths]
        s["restart_plans"] = [p.shares for p in outcome.plans[1:]]
        summary_path.write_text(json.dumps(s, indent=2) + "\n")
    return outcome.returncode
