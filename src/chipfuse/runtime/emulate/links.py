"""Emulated slow links: collectives that cross a link take the time the link would give them.

Written by hand because no library emulates a slow network between processes of one host (tc/netem
needs root and a real interface, and gloo on 127.0.0.1 moves gigabytes a second). The collective
really runs over gloo; each participant then sleeps until

    last arrival + rounds x latency + wire bytes / bandwidth

where, for a ring all-reduce among k members, every member sends wire bytes = 2(k-1)/k x payload
over its link in rounds = 2(k-1) dependent steps (reduce-scatter then all-gather). "Last arrival"
is the moment the slowest member entered: a real transfer cannot start before, so early ranks
wait for it as they would on a real network. It is taken from the host clock (time.time(), one
clock for every process of a host) with a tiny MAX all-reduce before the payload.

Fidelity is measured, not assumed: `LinkStats` keeps the payload, the wire bytes and the wall time
of every crossing, and `effective_bandwidth` gives what the link actually moved (an emulated
100 Mbit/s link should move about 12.5 MB/s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from chipfuse.plan.hardware import ring_allreduce_s
from chipfuse.plan.islands import ring_allreduce_rounds, ring_allreduce_wire_bytes


@dataclass(kw_only=True)
class LinkStats:
    """What crossed an emulated link, as measured on one member."""

    calls: int = 0
    payload_bytes: float = 0.0
    wire_bytes: float = 0.0
    latency_total_s: float = 0.0
    """Sum of rounds x latency over the calls: the part of the time that is not bandwidth."""
    elapsed_s: float = 0.0
    """Wall time from each call's last arrival to its end, summed."""
    real_s: float = 0.0
    """Wall time the real gloo collectives took, summed (the rest was padding)."""
    late_calls: int = 0
    """Calls where the real collective alone took longer than the emulated link allows."""
    history: list[float] = field(default_factory=list)

    @property
    def effective_bandwidth(self) -> float:
        """Bytes per second the link moved, latency excluded (compare with the nominal figure)."""
        busy = self.elapsed_s - self.latency_total_s
        return self.wire_bytes / busy if busy > 0 else float("inf")

    @classmethod
    def summed(cls, dicts: list[dict]) -> LinkStats:
        """The stats of several members' to_dict() added up (what they put on one shared link)."""
        out = cls()
        for d in dicts:
            for k in ("calls", "late_calls"):
                setattr(out, k, getattr(out, k) + int(d[k]))
            for k in ("payload_bytes", "wire_bytes", "elapsed_s", "real_s", "latency_total_s"):
                setattr(out, k, getattr(out, k) + float(d.get(k, 0.0)))
        return out

    def to_dict(self) -> dict:
        return {"latency_total_s": self.latency_total_s, "calls": self.calls, "payload_bytes": self.payload_bytes,
                "wire_bytes": self.wire_bytes,
                "elapsed_s": self.elapsed_s, "real_s": self.real_s, "late_calls": self.late_calls,
                "effective_bandwidth_bytes_s": self.effective_bandwidth}


class EmulatedLink:
    """A link of `bandwidth_bytes_s` (one direction) and `latency_s` joining the members of `group`.

    Every member of the group must call `all_reduce` together, as with any collective.
    bandwidth_bytes_s=inf and latency_s=0 give an unpadded (fast) link with the same code path.
    """

    def __init__(self, *, bandwidth_bytes_s: float, latency_s: float, group: dist.ProcessGroup | None = None):
        if bandwidth_bytes_s <= 0 or latency_s < 0:
            raise ValueError(f"link bandwidth {bandwidth_bytes_s} B/s and latency {latency_s} s. "
                             "Fix: give a positive bandwidth and a latency of 0 or more")
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self.latency_s = latency_s
        self.group = group
        self.stats = LinkStats()

    @property
    def members(self) -> int:
        return dist.get_world_size(self.group)

    def predict_s(self, payload_bytes: float) -> float:
        return ring_allreduce_s(payload_bytes, self.members, self.bandwidth_bytes_s, self.latency_s)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        """All-reduce in place across the link, taking (at least) the emulated link's time."""
        k = self.members
        if k <= 1:
            return
        arrival = torch.tensor([time.time()], dtype=torch.float64)
        dist.all_reduce(arrival, op=dist.ReduceOp.MAX, group=self.group)
        start = float(arrival.item())
        t0 = time.time()
        dist.all_reduce(tensor, op=op, group=self.group)
        real = time.time() - t0
        payload = tensor.numel() * tensor.element_size()
        wait = start + self.predict_s(payload) - time.time()
        if wait > 0:
            time.sleep(wait)
        else:
            self.stats.late_calls += 1
        s = self.stats
        s.calls += 1
        s.payload_bytes += payload
        s.wire_bytes += ring_allreduce_wire_bytes(payload, k)
        s.latency_total_s += ring_allreduce_rounds(k) * self.latency_s
        elapsed = time.time() - start
        s.elapsed_s += elapsed
        s.real_s += real
        s.history.append(elapsed)
