"""Batch shares for data-parallel replicas: whole samples, summing to the batch, in proportion to speed,
within a cap per device. What fits a device's memory is plan/memory.py's to say (the one memory model).

Written by hand: no library splits a batch unevenly (DDP and FSDP assume equal shares).
"""

from __future__ import annotations

import math

from chipfuse.errors import PlanError


def even_shares(names: list[str], batch: int) -> dict[str, int]:
    base, extra = divmod(batch, len(names))
    return {n: base + (1 if i < extra else 0) for i, n in enumerate(names)}


def proportional_shares(speeds: dict[str, float], batch: int, *, max_share: dict[str, int] | None = None) -> dict[str, int]:
    """Largest-remainder shares proportional to `speeds`; devices at their cap give the rest to others."""
    for k, v in speeds.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise PlanError(f"device {k!r}: speed {v!r} is not a positive finite number. Fix: give a speed above 0")
    caps = dict(max_share or {})
    if caps and sum(caps.get(k, batch) for k in speeds) < batch:
        raise PlanError(f"the devices can take at most {sum(caps.get(k, batch) for k in speeds)} samples, "
                        f"the batch is {batch}. Fix: lower the global batch or add devices")
    shares = {k: 0 for k in speeds}
    free = dict(speeds)
    left = batch
    while left > 0 and free:
        total = sum(free.values())
        exact = {k: left * v / total for k, v in free.items()}
        capped = [k for k in free if k in caps and exact[k] >= caps[k] - shares[k]]
        if capped:
            for k in capped:
                left -= caps[k] - shares[k]
                shares[k] = caps[k]
                del free[k]
            continue
        floors = {k: int(math.floor(x)) for k, x in exact.items()}
        rest = left - sum(floors.values())
        order = sorted(free, key=lambda k: exact[k] - floors[k], reverse=True)
        for i, k in enumerate(order):
            shares[k] += floors[k] + (1 if i < rest else 0)
        left = 0
    return shares
