"""What the training loop calls to endure: resume, the non-finite loss policy, a clean stop,
online rebalancing, an emulated slowdown, and periodic checkpoints. The loop calls three hooks:

    start = endure.resume(model, optimizer, steps)   # after the optimizer exists
    if endure.before_update(step, res.loss_sum):     # after the gradient all-reduce
        optimizer.step()
    extra = endure.after_step(step, per_rank_rows)   # after the per-step gather; goes in the log row
    if endure.stopping: break
    endure.finish(last_step + 1)

All decisions are taken from numbers every rank holds (an all-reduce or the per-step gather),
so every rank takes the same one without another message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.endure.balance import BalanceConfig, Rebalancer, with_shares
from chipfuse.runtime.endure.guard import CleanStop, LossGuard, NonFiniteLossError, die_with_parent


@dataclass(frozen=True, kw_only=True)
class EndureConfig:
    checkpoint_dir: str | None = None
    """Where checkpoints go (DIR/step_NNNNNN/); None = no checkpoints."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0 = only on a clean stop and at the end)."""
    checkpoint_keep: int = 3
    resume: str | None = None
    """A checkpoint directory (or one step_NNNNNN/ in it) to continue from."""
    nan_policy: str = "skip"
    """Non-finite loss: 'skip' the update and report, or 'stop'."""
    rebalance: bool = True
    """Move samples off a device that slows down, without a restart (pure data parallel only)."""
    balance: BalanceConfig = BalanceConfig()
    slowdown: str = ""
    """Emulation: 'DEVICE@STEP:FACTOR' multiplies DEVICE's speed by FACTOR from step STEP on."""


@dataclass(frozen=True, kw_only=True)
class Slowdown:
    device: str
    step: int
    factor: float

    @classmethod
    def parse(cls, text: str) -> Slowdown:
        m = re.fullmatch(r"([^@]+)@(\d+):([0-9.]+)", text.strip())
        if not m or float(m.group(3)) <= 0:
            raise ChipfuseError(f"--slowdown {text!r}: not DEVICE@STEP:FACTOR. Fix: e.g. `--slowdown slow@20:0.5` "
                                "halves device slow's speed from step 20")
        return cls(device=m.group(1), step=int(m.group(2)), factor=float(m.group(3)))


class Endurance:
    def __init__(self, cfg: EndureConfig, *, plan: Plan, rank_names: list[str], name: str, worker: Any,
                 shares: dict[str, int], log: Callable[[str], Any] = print):
        self.cfg = cfg
        self.plan = plan
        self.rank_names = rank_names
        self.name = name
        self.worker = worker
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.log = log if self.is_main else (lambda m: None)
        self.order = [r.devices[0] for r in plan.replicas]
        self.shares = dict(shares)
        self.slowdown = Slowdown.parse(cfg.slowdown) if cfg.slowdown else None
        if self.slowdown and self.slowdown.device not in plan.devices:
            raise ChipfuseError(f"--slowdown names {self.slowdown.device!r}, not a device of the plan "
                                f"{list(plan.devices)}. Fix: name one of them")
        movable = len(self.order) > 1 and hasattr(worker, "set_share")
        self.rebalancer = (Rebalancer([self.shares[d] for d in self.order], cfg.balance, names=self.order)
                           if cfg.rebalance and movable else None)
        self.guard = LossGuard(policy=cfg.nan_policy, log=self.log, checkpoint_hint=self._last_hint())
        self.stop = CleanStop().install()
        if dist.is_initialized():  # a worker (not an in-process test): never outlive its launcher
            die_with_parent()
        self.stopping = False
        self.resumed_from: str | None = None
        self.saved: list[str] = []
        self.rebalances: list[dict] = []
        self._loss_ok = True
        # The loop sets this to data.Loader.position: checkpoints record where training is in the
        # data, and resume refuses other data (chipfuse.data.check_same_source).
        self.data_position: Callable[[int], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ hooks
    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> int:
        """Load the checkpoint named by `resume` (if any); return the first step to train (< steps)."""
        self._model, self._optimizer = model, optimizer
        self._resumed_path: Path | None = None
        if not self.cfg.resume:
            return 0
        r = checkpoint.load(self.cfg.resume, model=model, optimizer=optimizer, log=self.log)
        checkpoint.check_resumable(r.plan, self.plan, str(r.path))
        if self.data_position is not None:
            from chipfuse.data.loader import check_same_source

            check_same_source(r.extra.get("data"), self.data_position(r.step), str(r.path))
        if r.step >= steps:
            raise ChipfuseError(f"{r.path} is at step {r.step} and --steps is {steps}: nothing to train. "
                                f"Fix: give --steps above {r.step}")
        self.resumed_from = str(r.path)
        self._resumed_path = r.path
        self.log(f"chipfuse: resumed from {r.path} at step {r.step} (plan over {list(self.plan.devices)})")
        return r.step

    def attach(self, sync: Any) -> None:
        """The gradient sync (runtime.sync.grad_sync) whose own state checkpoints keep: DiLoCo's outer
        momentum and last synchronised weights, and each island's own weights and inner optimizer
        (islands differ between outer steps). Call after `resume` and after building the sync; a
        resumed run then continues the round exactly where it was saved."""
        self._sync = sync
        if self._resumed_path is None:
            return
        state = self._sync_state()
        if state and checkpoint.load_state(self._resumed_path, state):
            own = state.get("replica")
            if own:
                (sd,) = own.values()
                set_state_dict(self._model, self._optimizer, model_state_dict=sd["model"],
                               optim_state_dict=sd["optim"], options=checkpoint.OPTIONS)
            sync.load_state_dict(state["sync"])
        elif state:
            self.log(f"chipfuse: {self._resumed_path} holds no island state (written without islands): the "
                     "outer loop starts afresh from the loaded weights")

    def _sync_state(self) -> dict[str, Any]:
        sync = getattr(self, "_sync", None)
        sd = sync.state_dict() if sync is not None else {}
        if sync is None or not sd:
            return {}
        out: dict[str, Any] = {"sync": sd}
        if sync.replica_key:
            model_sd, optim_sd = get_state_dict(self._model, self._optimizer, options=checkpoint.OPTIONS)
            out["replica"] = {sync.replica_key: {"model": model_sd, "optim": optim_sd}}
        return out

    def before_update(self, step: int, local_loss_sum: float) -> bool:
        """Agree on the global loss and on a stop request (one all-reduce); apply the NaN policy."""
        t = torch.tensor([local_loss_sum, 1.0 if self.stop.requested else 0.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t)
        self.stopping = self.stopping or t[1].item() > 0
        loss = t[0].item() / (self.plan.global_batch * self.plan.seq_len)
        try:
            self._loss_ok = self.guard.admit(step, loss)
        except NonFiniteLossError:
            self.stop.restore()  # the run ends here; give the signals back (in-process runs, tests)
            raise
        return self._loss_ok

    def after_step(self, step: int, per_rank: list[dict[str, float]]) -> dict[str, Any]:
        """Rebalance, apply an emulated slowdown, save a checkpoint when due. Returns log fields."""
        extra: dict[str, Any] = {"time_unix_s": time.time()}
        if not self._loss_ok:
            extra["update_skipped"] = True
        if self.resumed_from and step == self._first_step_after_resume():
            extra["resumed_from"] = self.resumed_from
        if self.rebalancer is not None:
            by_name = dict(zip(self.rank_names, per_rank, strict=True))
            ev = self.rebalancer.observe(step, [by_name[d]["compute_s"] for d in self.order])
            if ev is not None:
                self._apply(list(ev.new_shares))
                extra["rebalance"] = ev.to_dict()
                self.rebalances.append(ev.to_dict())
                self.log(f"chipfuse: step {step}: shares {dict(zip(self.order, ev.old_shares, strict=True))} -> "
                         f"{dict(zip(self.order, ev.new_shares, strict=True))}: {ev.reason}")
        if self.slowdown and step + 1 == self.slowdown.step and self.name == self.slowdown.device:
            pacers = self._pacers()
            if not pacers:
                raise ChipfuseError(f"--slowdown: device {self.name!r} is not emulated. Fix: slow an emulated one")
            for pacer in pacers:
                pacer.speed *= self.slowdown.factor
        if self.slowdown and step + 1 == self.slowdown.step:
            extra["slowdown"] = {"device": self.slowdown.device, "factor": self.slowdown.factor, "emulated": True}
        due = self.cfg.checkpoint_every and (step + 1) % self.cfg.checkpoint_every == 0
        if self.cfg.checkpoint_dir and (due or self.stopping):
            path = self.save(step + 1)
            extra["checkpoint"] = path
        if self.stopping:
            self.log(f"chipfuse: stop requested ({self.stop.signal_name or 'signal'} on some worker); stopped "
                     f"after step {step}" + (f", checkpoint {extra['checkpoint']}. Resume with "
                                             f"`chipfuse train --resume {self.cfg.checkpoint_dir}`"
                                             if "checkpoint" in extra else " without a checkpoint (no --checkpoint-dir)"))
        return extra

    def finish(self, steps_done: int) -> None:
        """At the end of the run: a last checkpoint (unless one was just written), then restore signals."""
        if self.cfg.checkpoint_dir and not self.stopping and (
                not self.saved or not self.saved[-1].endswith(f"step_{steps_done:06d}")):
            self.save(steps_done)
        self.stop.restore()

    def summary(self) -> dict[str, Any]:
        return {"resumed_from": self.resumed_from, "checkpoints": self.saved, "rebalances": self.rebalances,
                "skipped_steps": self.guard.skipped, "stopped_by_signal": self.stopping,
                "final_shares": self.shares}

    # ------------------------------------------------------------------ helpers
    def save(self, step: int) -> str:
        assert self.cfg.checkpoint_dir is not None
        plan = with_shares(self.plan, [self.shares[d] for d in self.order])
        path = checkpoint.save(self.cfg.checkpoint_dir, step=step, model=self._model, optimizer=self._optimizer,
                               plan=plan.to_dict(), keep=self.cfg.checkpoint_keep, state=self._sync_state(),
                               extra={"shares": self.shares,
                                      **({"data": self.data_position(step)} if self.data_position else {})})
        self.saved.append(str(path))
        self.guard.checkpoint_hint = str(path)
        return str(path)

    def _pacers(self) -> list[Any]:
        """The worker's emulation pacers: one (data parallel) or forward and backward (pipeline)."""
        if hasattr(self.worker, "pacer"):
            return [self.worker.pacer] if self.worker.pacer is not None else []
        clock = getattr(self.worker, "clock", None)
        return [p for p in (getattr(clock, "fwd", None), getattr(clock, "bwd", None)) if p is not None]

    def _apply(self, shares: list[int]) -> None:
        self.shares = dict(zip(self.order, shares, strict=True))
        offset = 0
        mine = getattr(self.worker, "replica_key", self.name)  # every rank of a pipeline replica moves with it
        for d in self.order:
            if d == mine:
                self.worker.set_share(offset=offset, share=self.shares[d])
            offset += self.shares[d]

    def _first_step_after_resume(self) -> int:
        return int(self.resumed_from.rsplit("_", 1)[-1]) if self.resumed_from else -1

    def _last_hint(self) -> str:
        if not self.cfg.checkpoint_dir:
            return ""
        steps = checkpoint.complete_steps(self.cfg.checkpoint_dir)
        return str(checkpoint.step_dir(self.cfg.checkpoint_dir, steps[-1])) if steps else ""
