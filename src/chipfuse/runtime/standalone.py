"""A device's standalone throughput, measured the way the job measures it.

Fusion efficiency divides the job's tokens/s by the sum of each device's tokens/s alone; the two
must be measured alike or the ratio says nothing (it printed 1.28 once: a few samples, timed
from the first, unwarmed call, against a job timed over warmed-up steps). So the standalone
figure is taken as the job runs a device's share:

- the same unit of work: micro-batches of the job's micro-batch size, forward and backward,
  each padded by the same Pacer (the same emulated speed and unit) as in the job;
- warmed up: `warmup` micro-batches first, not timed (allocator, caches, lazy init);
- enough samples: at least `min_micro_batches` timed micro-batches, and the figure is their
  median seconds per sample, so one descheduled micro-batch on a busy host does not move it.

Every rank measures alone (the others wait at a barrier), as a device would run alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from chipfuse.runtime.emulate import Pacer


def standalone_tokens_per_s(micro_batch: Callable[[int], object], *, micro_batch_size: int, seq_len: int,
                            samples: int, pacer: Pacer | None = None, warmup: int = 1,
                            min_micro_batches: int = 5) -> float:
    """Tokens/s of one device alone: `micro_batch(n)` computes forward and backward of n samples
    (as the job's worker does); `samples` is a floor on the samples timed."""
    n = max(1, micro_batch_size)
    for _ in range(warmup):
        micro_batch(n)
    count = max(min_micro_batches, -(-samples // n))
    per_sample = []
    for _ in range(count):
        t0 = time.perf_counter()
        micro_batch(n)
        if pacer is not None:
            pacer.pad(t0, n)
        per_sample.append((time.perf_counter() - t0) / n)
    return seq_len / statistics.median(per_sample)
