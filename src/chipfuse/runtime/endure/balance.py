"""Online rebalancing of data-parallel shares when a device slows down (a straggler).

Every step each replica measures its compute seconds (forward + backward, before the gradient
all-reduce, where a fast replica would only wait). All ranks gather the same numbers, feed the
same pure `Rebalancer`, and so reach the same decision without another message. Written by hand:
no library rebalances unequal data-parallel shares.

Rule: keep an EMA of seconds per sample per replica; the predicted step time of a set of shares
is max_i(share_i * s_per_sample_i); propose shares proportional to 1 / s_per_sample (whole
samples, largest remainder, at least `min_share` each), and switch only when the predicted step
time drops by more than `min_gain` for `patience_steps` steps in a row and `cooldown_steps` have
passed since the last switch (the EMA must first learn the new speed), so that noise does not make
the shares flap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from chipfuse.plan.shares import proportional_shares


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    ema: float = 0.5
    """Weight of the newest step in the moving average of seconds per sample."""
    min_gain: float = 0.1
    """Switch only when the predicted step time falls by more than this fraction."""
    warmup_steps: int = 3
    """Steps measured before the first decision (the first steps are slow everywhere)."""
    cooldown_steps: int = 3
    """Steps after a switch before the next one may happen."""
    patience_steps: int = 3
    """Consecutive steps the gain must pass `min_gain` before a switch: a slowdown is seen at once,
    but the EMA needs a few steps to learn its size, and switching early means switching twice."""
    min_share: int = 1
    """Samples every replica keeps, so that its speed stays measured."""


@dataclass(frozen=True, kw_only=True)
class Rebalance:
    step: int
    old_shares: tuple[int, ...]
    new_shares: tuple[int, ...]
    s_per_sample: tuple[float, ...]
    predicted_old_s: float
    predicted_new_s: float
    reason: str

    def to_dict(self) -> dict:
        return {"event": "rebalance", **dataclasses.asdict(self)}


def predicted_step_s(shares: list[int] | tuple[int, ...], s_per_sample: list[float] | tuple[float, ...]) -> float:
    return max(n * s for n, s in zip(shares, s_per_sample, strict=True))


def best_shares(s_per_sample: list[float], total: int, *, min_share: int = 1) -> list[int]:
    """Proportional shares, then single-sample moves off the predicted slowest replica while they help
    (rounding can leave the slowest one a sample too many)."""
    n = len(s_per_sample)
    if total < n * min_share:
        raise ValueError(f"cannot give {n} replicas {min_share} samples each from {total}")
    # Every replica keeps min_share; the rest goes in proportion to speed (largest remainder).
    rest = proportional_shares({str(i): 1.0 / s for i, s in enumerate(s_per_sample)}, total - n * min_share)
    shares = [rest[str(i)] + min_share for i in range(n)]
    while True:
        times = [n * s for n, s in zip(shares, s_per_sample, strict=True)]
        slow = max(range(len(shares)), key=times.__getitem__)
        fast = min(range(len(shares)), key=lambda i: (shares[i] + 1) * s_per_sample[i])
        if shares[slow] <= min_share or slow == fast:
            return shares
        trial = list(shares)
        trial[slow] -= 1
        trial[fast] += 1
        if predicted_step_s(trial, s_per_sample) >= predicted_step_s(shares, s_per_sample) - 1e-12:
            return shares
        shares = trial


class Rebalancer:
    """Pure: per-step compute seconds in, occasionally new shares out (same on every rank)."""

    def __init__(self, shares: list[int] | tuple[int, ...], config: BalanceConfig | None = None,
                 names: list[str] | tuple[str, ...] | None = None):
        self.shares = tuple(shares)
        self.config = config or BalanceConfig()
        self.names = tuple(names) if names else tuple(f"replica{i}" for i in range(len(shares)))
        self.s_per_sample: list[float] | None = None
        self._measured = 0
        self._since_switch = 0
        self._ahead = 0
        self.history: list[Rebalance] = []

    def observe(self, step: int, compute_s: list[float] | tuple[float, ...]) -> Rebalance | None:
        """Record one step's compute seconds per replica (under the current shares); maybe switch."""
        c = self.config
        now = [t / n if n else float("nan") for t, n in zip(compute_s, self.shares, strict=True)]
        if self.s_per_sample is None:
            self.s_per_sample = now
        else:
            self.s_per_sample = [old if math.isnan(x) else c.ema * x + (1 - c.ema) * old
                                 for x, old in zip(now, self.s_per_sample, strict=True)]
        self._measured += 1
        self._since_switch += 1
        if self._measured < c.warmup_steps or self._since_switch <= c.cooldown_steps:
            return None
        sps = self.s_per_sample
        if any(math.isnan(s) or s <= 0 for s in sps):
            return None
        total = sum(self.shares)
        new = best_shares(sps, total, min_share=c.min_share)
        old_s, new_s = predicted_step_s(self.shares, sps), predicted_step_s(new, sps)
        if new_s >= old_s * (1 - c.min_gain):
            self._ahead = 0
            return None
        self._ahead += 1
        if self._ahead < c.patience_steps:
            return None
        slowest = max(range(len(sps)), key=lambda i: self.shares[i] * sps[i])
        fastest = min(sps)
        reason = (f"{self.names[slowest]} takes {sps[slowest] * 1e3:.1f} ms/sample "
                  f"({sps[slowest] / fastest:.2f}x the fastest); predicted step "
                  f"{old_s:.3f} s -> {new_s:.3f} s")
        ev = Rebalance(step=step, old_shares=self.shares, new_shares=tuple(new), s_per_sample=tuple(sps),
                       predicted_old_s=old_s, predicted_new_s=new_s, reason=reason)
        self.shares = tuple(new)
        self._since_switch = self._ahead = 0
        self.history.append(ev)
        return ev


def with_shares(plan, shares: list[int] | tuple[int, ...]):  # (Plan, shares) -> Plan
    """The same plan with new batch shares per replica (micro-batches clipped to the new share)."""
    reps = tuple(dataclasses.replace(r, batch_share=n, micro_batch_size=max(1, min(r.micro_batch_size, n) or 1))
                 for r, n in zip(plan.replicas, shares, strict=True))
    return dataclasses.replace(plan, replicas=reps, global_batch=sum(shares))
