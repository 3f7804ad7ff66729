"""Unequal batch shares: give each replica as many samples as it finishes by a common deadline.

A replica with fill time F (its pipeline's sum minus one steady micro-batch), steady micro-batch
time S and micro-batch size b takes F + ceil(n / b) x S for n samples. The smallest deadline T at
which the replicas together take the global batch is found by bisection; each then takes the
most whole micro-batches it can by T, and the surplus is taken back from the largest shares, so
shares are whole samples summing exactly to the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ReplicaRate:
    fill_s: float
    steady_s: float
    micro_batch_size: int
    count: int = 1
    """Identical replicas this entry stands for."""
    max_share: int | None = None
    """Most samples one replica may take (e.g. GPipe memory); None = no limit."""

    def samples_by(self, t: float) -> int:
        if t < self.fill_s + self.steady_s:
            return 0
        n = int(math.floor((t - self.fill_s) / self.steady_s + 1e-9)) * self.micro_batch_size
        return n if self.max_share is None else min(n, self.max_share)

    def time_for(self, n: int) -> float:
        return self.fill_s + math.ceil(n / self.micro_batch_size) * self.steady_s if n > 0 else 0.0


def balance_shares(rates: list[ReplicaRate], global_batch: int) -> list[list[int]]:
    """Shares per replica (one list per entry, `count` long), summing to global_batch."""
    if not rates:
        raise ValueError("no replicas")
    hi = max(r.time_for(global_batch) for r in rates)  # any uncapped replica alone finishes by then
    lo = 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(r.samples_by(mid) * r.count for r in rates) >= global_batch:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    shares = [[r.samples_by(hi)] * r.count for r in rates]
    if sum(map(sum, shares)) < global_batch:  # a single replica with a share cap: fall back to equal
        flat = [(i, j) for i, r in enumerate(rates) for j in range(r.count)]
        base, extra = divmod(global_batch, len(flat))
        return [[base + (1 if (i, j) in set(flat[:extra]) else 0) for j in range(r.count)] for i, r in enumerate(rates)]
    surplus = sum(map(sum, shares)) - global_batch
    # Take the surplus back one sample at a time from the replica that would finish last.
    order = sorted(((i, j) for i, r in enumerate(rates) for j in range(r.count)),
                   key=lambda ij: -rates[ij[0]].time_for(shares[ij[0]][ij[1]]))
    while surplus > 0:
        for i, j in order:
            if surplus == 0:
                break
            take = min(surplus, shares[i][j] - _floor_mb(shares[i][j], rates[i].micro_batch_size))
            if take == 0 and shares[i][j] > 0:
                take = min(surplus, rates[i].micro_batch_size, shares[i][j])
            shares[i][j] -= take
            surplus -= take
    return shares


def _floor_mb(n: int, b: int) -> int:
    """The share with its last, partial micro-batch removed (n itself if it has none)."""
    return n - (n % b) if n % b else n


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Whole numbers proportional to `weights`, summing to `total`: plan.shares' rounding, by position."""
    from chipfuse.plan.shares import proportional_shares

    shares = proportional_shares({str(i): w for i, w in enumerate(weights)}, total)
    return [shares[str(i)] for i in range(len(weights))]
