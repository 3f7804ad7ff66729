"""`chipfuse train` flags for enduring failures, and what the launcher does with them.

Kept out of commands/train.py so that the train command only calls: `add_arguments`, `prepare`
(exclusions, the plan a resumed run continues with, refusals before any worker starts),
`config` (the workers' EndureConfig) and `launch` (the supervisor)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from chipfuse.cluster.pool import Pool
from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.endure.endure import EndureConfig
from chipfuse.runtime.endure.guard import NAN_POLICIES
from chipfuse.runtime.launch.runspec import RunSpec
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


def excluded(args: argparse.Namespace) -> tuple[str, ...]:
    """The devices --exclude leaves out (the run spec records them: its workers load the same pool)."""
    return tuple(n for n in args.exclude.split(",") if n)


def exclude(args: argparse.Namespace, pool: Pool) -> Pool:
    names = list(excluded(args))
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
    a new one of the same kind over the pool with the checkpoint's model, batch and sequence (the
    samples of a step depend on those alone). Refuses a fresh run into a directory that already holds checkpoints."""
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
    elif not saved.is_pure_data_parallel:  # a pipeline stays a pipeline over the devices here
        from chipfuse.runtime.endure.replan import same_kind_plan

        plan = same_kind_plan(saved, pool)
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


def supervised(args: argparse.Namespace) -> bool:
    """Launch under chipfuse's supervisor (survives a lost device) rather than plain torchrun."""
    return bool(args.checkpoint_dir)


def launch(args: argparse.Namespace, spec: RunSpec, *, pool: Pool) -> tuple[int, dict[str, Any]]:
    """Run the workers under the supervisor. Returns the exit status and what the summary adds: the
    devices lost and the plans of the restarts (commands/train.py writes the summary once).

    After a death the survivors are re-planned keeping the plan's kind (runtime/endure/replan.py);
    each launch's workers load a spec of their own, written beside the plan the supervisor wrote."""
    from chipfuse.runtime.endure.replan import replan_survivors
    from chipfuse.runtime.launch.supervisor import supervise

    def make_argv(plan_path: Path, resume: str | None) -> list[str]:
        launch_spec = replace(spec, plan=Plan.from_json(plan_path))
        path = launch_spec.save(plan_path.with_name(plan_path.name.replace("plan.", "runspec.", 1)))
        return [sys.executable, "-m", "chipfuse.runtime.launch.worker", str(path),
                *(["--resume", resume] if resume else [])]

    assert spec.train.endure.checkpoint_dir is not None  # supervised() is true
    outcome = supervise(spec.plan, make_argv, checkpoint_dir=spec.train.endure.checkpoint_dir,
                        resume_from=args.resume, policy=args.on_device_loss,
                        replan=lambda old, dead: replan_survivors(old, pool, dead),
                        env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    extra = {"device_losses": [{"device": d.device, "rank": d.rank, "how": d.how,
                                "detected_unix_s": d.detected_unix_s} for d in outcome.deaths],
             "restart_plans": [p.shares for p in outcome.plans[1:]]}
    return outcome.returncode, extra
