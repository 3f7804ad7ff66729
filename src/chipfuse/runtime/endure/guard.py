"""Guards the training loop calls: a non-finite loss policy and a clean stop on Ctrl-C / SIGTERM."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from typing import Any

from chipfuse.errors import ChipfuseError

NAN_POLICIES = ("skip", "stop")


class NonFiniteLossError(ChipfuseError):
    """The loss became NaN or infinite and the policy says stop."""


class LossGuard:
    """Decides what to do with a step whose (global) loss is not finite.

    Call `admit(step, loss)` with the loss every rank agrees on (after the all-reduce), before the
    optimizer step: True = apply the update; False = skip it (grads are dropped, the data position
    still advances, so the bad batch is not retried). `skip` stops anyway after
    `max_consecutive_skips`, since then the model itself is broken, not one batch.
    """

    def __init__(self, *, policy: str = "skip", max_consecutive_skips: int = 5,
                 log: Callable[[str], Any] = print, checkpoint_hint: str = ""):
        if policy not in NAN_POLICIES:
            raise ChipfuseError(f"nan_policy: {policy!r} is not a policy. Fix: use one of {NAN_POLICIES}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.log = log
        self.checkpoint_hint = checkpoint_hint
        self.skipped: list[int] = []
        self._run = 0

    def admit(self, step: int, loss: float) -> bool:
        if math.isfinite(loss):
            self._run = 0
            return True
        where = f" Last checkpoint: {self.checkpoint_hint}." if self.checkpoint_hint else ""
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"step {step}: loss is {loss}; stopped (nan_policy=stop).{where} Fix: lower the learning "
                "rate or use dtype fp32, then resume; or set nan_policy=skip to drop such steps")
        self.skipped.append(step)
        self._run += 1
        if self._run > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"step {step}: loss is {loss} for {self._run} steps in a row; stopped (nan_policy=skip "
                f"allows {self.max_consecutive_skips}).{where} Fix: the weights have diverged: lower the "
                "learning rate and resume from the checkpoint")
        self.log(f"chipfuse: step {step}: loss is {loss}; update skipped (nan_policy=skip, "
                 f"{len(self.skipped)} skipped so far)")
        return False


class CleanStop:
    """Turns SIGINT / SIGTERM into a request the loop honours at the end of a step.

    The loop ORs the flag over ranks (one float in the per-step gather), so all ranks stop after the
    same step, save a checkpoint, and exit 0. A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        """The first signal received."""
        self._interrupts = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # Ctrl-C twice: the user means it (a launcher's SIGTERM does not count)
                self.restore()
                raise KeyboardInterrupt
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def install(self) -> CleanStop:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self) -> CleanStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when the process that started it dies (prctl
    PR_SET_PDEATHSIG), so a supervisor or launcher killed with SIGKILL leaves no worker behind,
    holding a port and a device. Used as `preexec_fn` (the flag survives exec) and by workers
    started by another launcher. False where the call does not exist (not Linux)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
