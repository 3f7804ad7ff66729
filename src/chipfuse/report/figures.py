"""Figures that cannot lie: a ratio outside the range it can physically take is a measurement
fault, reported with its reason, never printed as a result.

Fusion efficiency (the job over the sum of each device alone) cannot pass 1.0; a speed-up of
proportional shares over an even split cannot pass the ratio of total to slowest-times-count
speed; a fraction of time lies in [0, 1]. A value past such a limit means the two measurements
behind it were taken differently or were disturbed (a busy host), and saying so is the result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Checked:
    value: float | None
    """The ratio, or None when it is a fault (or cannot be computed)."""
    fault: str | None = None
    """Why the measured value is not a result; None when it is one."""

    def text(self, fmt: str = "{:.2f}") -> str:
        return fmt.format(self.value) if self.value is not None else f"n/a ({self.fault})"


def checked_ratio(num: float | None, den: float | None, *, what: str, lo: float = 0.0, hi: float = math.inf,
                  why: str = "") -> Checked:
    """num / den when it lies in [lo, hi]; else a fault naming the measured value, the limit and why
    the limit holds (`why`), with the host's load (the usual cause)."""
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den <= 0:
        return Checked(value=None, fault=f"{what}: not measured (numerator {num}, denominator {den})")
    r = num / den
    if lo <= r <= hi:
        return Checked(value=r)
    limit = f"above its limit {hi:g}" if r > hi else f"below its limit {lo:g}"
    return Checked(value=None, fault=(f"measurement fault: {what} came out {r:.3f}, {limit}"
                                      + (f" ({why})" if why else "")
                                      + f"; the two measurements behind it disagree (host load average "
                                      f"{os.getloadavg()[0]:.1f}); not a result"))


def checked_fields(name: str, c: Checked) -> dict[str, float | str | None]:
    """Summary fields `name` and `name_fault` (the second only when there is a fault)."""
    return {name: c.value, **({f"{name}_fault": c.fault} if c.fault else {})}
