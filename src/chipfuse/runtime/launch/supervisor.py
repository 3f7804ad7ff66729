"""A supervisor over the training workers: notices a dead device at once and recovers or stops.

torchrun's elastic agent restarts a failed group with the same number of workers per node; a
pool that lost a chip has fewer. So chipfuse starts the workers itself (one process per device,
the environment torchrun would give them: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), polls
them every `poll_s`, and when one exits abnormally (SIGKILL included) it:

1. names the device that died (rank i runs `plan.devices[i]`) and how (signal or exit code);
2. ends the survivors, which would otherwise sit in a gloo collective until its timeout;
3. with policy "restart": re-plans over the survivors (`survivor_plan`, or a re-planner passed in)
   and starts them again from the last good checkpoint; with policy "stop": prints what died,
   the last checkpoint, and the command that resumes.

Written by hand because the shrink-on-failure step is chipfuse's own (the survivors' new shares).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.plan.shares import proportional_shares
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.endure.balance import with_shares
from chipfuse.runtime.endure.guard import die_with_parent
from chipfuse.runtime.launch import dist as cfdist


@dataclass(frozen=True, kw_only=True)
class Death:
    rank: int
    device: str
    pid: int
    returncode: int
    detected_unix_s: float

    @property
    def how(self) -> str:
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exited with code {self.returncode}"


@dataclass(kw_only=True)
class Outcome:
    returncode: int
    deaths: list[Death] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    """The plan of every launch, the first one included."""
    messages: list[str] = field(default_factory=list)


def launch(argv: list[str], devices: tuple[str, ...] | list[str], *,
           env: dict[str, str] | None = None) -> tuple[list[subprocess.Popen], TCPStore]:
    """Start one worker per device with torchrun's environment; rank i runs devices[i].

    The rendezvous store is hosted here (runtime.launch.dist.rendezvous). Keep the returned store
    alive while the workers run."""
    store, rdzv = cfdist.rendezvous(len(devices))
    procs = []
    for rank, name in enumerate(devices):
        e = {**os.environ, **(env or {}), **rdzv, "RANK": str(rank), "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": str(len(devices)), "CHIPFUSE_DEVICE_NAME": name}
        procs.append(subprocess.Popen(argv, env=e, preexec_fn=die_with_parent))
    return procs, store


def _end(procs: list[subprocess.Popen]) -> None:
    # SIGKILL, not SIGTERM: with a peer gone the group is broken, so a survivor can neither finish
    # its step nor save; a clean-stop handler would only make it wait for gloo's error.
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def watch(procs: list[subprocess.Popen], devices: tuple[str, ...] | list[str], *,
          poll_s: float = 0.05) -> Death | None:
    """Wait for the workers. None when all exit 0; else the first death, after ending the others."""
    while True:
        codes = [p.poll() for p in procs]
        for rank, rc in enumerate(codes):
            if rc is not None and rc != 0:
                death = Death(rank=rank, device=devices[rank], pid=procs[rank].pid, returncode=rc,
                              detected_unix_s=time.time())
                _end(procs)
                return death
        if all(rc == 0 for rc in codes):
            return None
        time.sleep(poll_s)


def survivor_plan(plan: Plan, dead: set[str]) -> Plan:
    """The plan without the replicas that held a dead device; the global batch is kept (it fixes
    each step's samples), given to the survivors in proportion to the shares they had."""
    keep = [r for r in plan.replicas if not set(r.devices) & dead]
    if not keep:
        raise ChipfuseError(f"every replica lost a device ({sorted(dead)}): nothing left to train on. "
                            "Fix: resume on another pool with `chipfuse train --resume DIR --pool NEW`")
    by_first = proportional_shares({r.devices[0]: max(r.batch_share, 1) for r in keep}, plan.global_batch)
    shares = [by_first[r.devices[0]] for r in keep]
    lost = sorted({d for r in plan.replicas if set(r.devices) & dead for d in r.devices} - dead)
    smaller = dataclasses.replace(plan, replicas=tuple(keep),
                                  excluded=tuple(plan.excluded) + tuple(sorted(dead)) + tuple(lost))
    new = with_shares(smaller, shares)
    new.check("survivor plan")
    return new


def supervise(plan: Plan, make_argv: Callable[[Path, str | None], list[str]], *, checkpoint_dir: str | Path,
              resume_from: str | Path | None = None, policy: str = "restart", max_restarts: int = 3,
              env: dict[str, str] | None = None,
              replan: Callable[[Plan, set[str]], Plan] = survivor_plan, poll_s: float = 0.05,
              log: Callable[[str], Any] = lambda m: print(m, file=sys.stderr, flush=True),
              on_launch: Callable[[list[subprocess.Popen], Plan], Any] | None = None) -> Outcome:
    """Run the job to the end through device deaths.

    `make_argv(plan_path, resume)`: the worker command for a plan file, resuming from the checkpoint
    directory `resume` when not None: `resume_from` for the first launch, `checkpoint_dir` after a
    death (when it holds a checkpoint; else the survivors start over). `on_launch(procs, plan)` lets a
    test or benchmark see the workers.
    """
    if policy not in ("restart", "stop"):
        raise ChipfuseError(f"on_device_loss: {policy!r}. Fix: use 'restart' or 'stop'")
    ckpt = Path(checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    out = Outcome(returncode=0)
    live: list[subprocess.Popen] = []
    stopping: list[bool] = []

    def forward_term(signum: int, frame: Any) -> None:  # a scheduler stops the job: stop the workers cleanly
        stopping.append(True)
        for p in live:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    # Ctrl-C reaches the workers too (same process group); they save and exit 0, and we wait for them.
    old = {signal.SIGINT: signal.signal(signal.SIGINT, lambda s, f: None),
           signal.SIGTERM: signal.signal(signal.SIGTERM, forward_term)}
    try:
        resume = str(resume_from) if resume_from else None
        dead: set[str] = set()
        for attempt in range(max_restarts + 1):
            plan_path = ckpt / f"plan.launch{attempt}.json"
            plan.to_json(plan_path)
            out.plans.append(plan)
            procs, store = launch(make_argv(plan_path, resume), plan.devices, env=env)
            live[:] = procs
            if on_launch:
                on_launch(procs, plan)
            death = watch(procs, plan.devices, poll_s=poll_s)
            del store  # a fresh store for every launch: keys of the last one must not leak into the next
            if death is None:
                return out
            if stopping:  # we asked them to stop; one that had not yet armed its handler just exits
                out.returncode = 1
                out.messages.append(f"chipfuse: stopped by SIGTERM; worker {death.device!r} {death.how}")
                log(out.messages[-1])
                return out
            out.deaths.append(death)
            dead.add(death.device)
            steps = checkpoint.complete_steps(ckpt)
            last = f"{checkpoint.step_dir(ckpt, steps[-1])}" if steps else "none yet"
            msg = (f"chipfuse: device {death.device!r} (rank {death.rank}, pid {death.pid}) {death.how}; "
                   f"the other workers were stopped. Last checkpoint: {last}.")
            if policy == "stop" or attempt == max_restarts:
                why = "on_device_loss=stop" if policy == "stop" else f"{max_restarts} restarts used"
                msg += (f" Stopping ({why}). Fix: resume on the remaining devices with "
                        f"`chipfuse train --resume {ckpt} --exclude {','.join(sorted(dead))}` "
                        "(plus the pool/plan options of this run)")
                log(msg)
                out.messages.append(msg)
                out.returncode = 1
                return out
            try:
                plan = replan(plan, dead)
            except ChipfuseError as e:
                msg += (f" Could not re-plan over the survivors: {e}. Stopping; resume with `chipfuse train "
                        f"--resume {ckpt} --exclude {','.join(sorted(dead))} --plan PLAN` once a plan fits")
                log(msg)
                out.messages.append(msg)
                out.returncode = 1
                return out
            resume = str(ckpt) if steps else None
            msg += (f" Restarting on {len(plan.devices)} survivors {list(plan.devices)} with shares "
                    f"{[r.batch_share for r in plan.replicas]} from {last}.")
            log(msg)
            out.messages.append(msg)
        return out
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
