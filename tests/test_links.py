"""Emulated links: the ring model, and the measured fidelity of an emulated 100 Mbit/s, 20 ms link."""

from __future__ import annotations

import pytest
import torch

from chipfuse.plan.hardware import ring_allreduce_s
from chipfuse.plan.islands import ring_allreduce_wire_bytes
from chipfuse.runtime.emulate.links import EmulatedLink
from tests.distributed import run_ranks

MBIT_S = 1e6 / 8  # bytes/s per Mbit/s
BANDWIDTH = 100 * MBIT_S
LATENCY_S = 0.02
PAYLOAD_FLOATS = 250_000  # 1 MB of fp32: 80 ms of wire time at 100 Mbit/s, twice the latency part


def test_ring_model():
    assert ring_allreduce_wire_bytes(1000, 1) == 0
    assert ring_allreduce_wire_bytes(1000, 2) == 1000
    assert ring_allreduce_wire_bytes(900, 3) == 1200
    assert ring_allreduce_s(1e6, 2, 1e6, 0.01) == pytest.approx(1.02)
    assert ring_allreduce_s(1e6, 1, 1e6, 0.01) == 0


def _worker(rank: int, world: int) -> dict:
    link = EmulatedLink(bandwidth_bytes_s=BANDWIDTH, latency_s=LATENCY_S)
    t = torch.full((PAYLOAD_FLOATS,), float(rank + 1))
    for _ in range(4):
        link.all_reduce(t)
        t.fill_(float(rank + 1))
    small = torch.ones(4)
    small_link = EmulatedLink(bandwidth_bytes_s=BANDWIDTH, latency_s=LATENCY_S)
    small_link.all_reduce(small)
    link.all_reduce(t)
    return {"stats": link.stats.to_dict(), "sum": t[:3].tolist(), "small_s": small_link.stats.elapsed_s,
            "small": small.tolist()}


@pytest.mark.slow
def test_emulated_link_fidelity():
    results = run_ranks(_worker, 2)
    for r in results:
        assert r["sum"] == [3.0, 3.0, 3.0] and r["small"] == [2.0] * 4  # the collective still computes
        # Loose band: sleeps overshoot by a millisecond or so, and a loaded machine can make the
        # real gloo transfer late; 25% either side of the nominal 12.5 MB/s.
        eff = r["stats"]["effective_bandwidth_bytes_s"]
        assert 0.75 * BANDWIDTH < eff < 1.25 * BANDWIDTH, f"moved {eff / 1e6:.2f} MB/s"
        # A 16-byte all-reduce is latency alone: two ring rounds of 20 ms.
        assert 0.75 * 2 * LATENCY_S < r["small_s"] < 1.25 * 2 * LATENCY_S + 0.01


def test_link_refuses_bad_figures():
    with pytest.raises(ValueError, match="Fix"):
        EmulatedLink(bandwidth_bytes_s=0, latency_s=0.0)
