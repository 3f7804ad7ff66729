"""A stage module that runs at an emulated device's speed, micro-batch by micro-batch.

Pipelines are paced per micro-batch (docs/emulation.md, "Facts measured on CPU"): the forward of one
micro-batch is padded to `slack x solo_fwd / speed`, its backward to `slack x solo_bwd / speed`,
where solo times are measured once with the worker alone on the machine. Backward is bracketed
by two identity autograd functions: one on the stage output (its backward runs first) and one
on the stage input side (its backward runs last). Every padded span is also recorded, so the
measured timeline can be drawn (compute spans; the gaps between them are sends and waits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from chipfuse.runtime.emulate.device import Pacer


@dataclass(kw_only=True)
class Clock:
    fwd: Pacer | None
    bwd: Pacer | None
    events: list[tuple[str, float, float]] = field(default_factory=list)
    """(kind, start_s, end_s) in time.perf_counter() seconds."""
    rows: int = 0
    """Rows of a full micro-batch (what the pacers' unit is); 0: every call counts as one."""
    _bwd_t0: list[float] = field(default_factory=list)
    _units: list[float] = field(default_factory=list)

    def units(self, rows: int) -> float:
        """A short micro-batch (a replica's last, unpadded) takes its share of a full one's time."""
        return rows / self.rows if self.rows else 1.0

    def bwd_started(self) -> None:
        self._bwd_t0.append(time.perf_counter())

    def bwd_done(self) -> None:
        t0 = self._bwd_t0.pop(0) if self._bwd_t0 else time.perf_counter()
        units = self._units.pop(0) if self._units else 1.0
        if self.bwd is not None:
            self.bwd.pad(t0, units)
        self.events.append(("bwd", t0, time.perf_counter()))


class _OnBackward(torch.autograd.Function):
    """Identity whose backward calls `hook()`: marks when backward reaches this point."""

    @staticmethod
    def forward(ctx, x, hook):  # type: ignore[override]
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.hook()
        return g, None


class PacedStage(nn.Module):
    """Wraps a stage module; forward and backward of each call take the emulated device's time.

    The module is called whole (so hooks on it, FSDP2's among them, run); the end of its backward is
    marked at the input of its first block (a forward pre-hook), which is where the stage's own
    input, token ids on a first stage, has no gradient to mark."""

    def __init__(self, inner: nn.Module, clock: Clock):
        super().__init__()
        self.inner = inner
        self.clock = clock
        from chipfuse.runtime.parallel.checkpointing import block_modules

        block_modules(inner)[0].register_forward_pre_hook(self._mark_input, with_kwargs=True)

    def _mark_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        h = args[0]
        if not (torch.is_grad_enabled() and h.requires_grad):
            return None
        return (_OnBackward.apply(h, self.clock.bwd_done), *args[1:]), kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        units = self.clock.units(x.shape[0])
        y = self.inner(x)
        if y.requires_grad:
            y = _OnBackward.apply(y, self.clock.bwd_started)
            self.clock._units.append(units)
        if self.clock.fwd is not None:
            self.clock.fwd.pad(t0, units)
        self.clock.events.append(("fwd", t0, time.perf_counter()))
        return y


def measure_solo(module: nn.Module, x: torch.Tensor, backward_fn, *, repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` forward and backward seconds of one micro-batch (after one warm-up)."""
    best_f = best_b = float("inf")
    for k in range(repeats + 1):
        xin = x.detach().requires_grad_(x.is_floating_point())
        t0 = time.perf_counter()
        y = module(xin)
        t1 = time.perf_counter()
        backward_fn(y)
        t2 = time.perf_counter()
        if k:
            best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
    module.zero_grad(set_to_none=True)
    return best_f, best_b
