"""Process groups by chip kind, and a bridge between vendors.

No vendor's collective library reaches another vendor's chips (NCCL knows no Ascend, HCCL no
H100). So a sum over ranks of several vendors is done in three hops: reduce inside each vendor's
group on its native backend, all-reduce among one leader per vendor over the bridge (gloo over
host memory), broadcast inside each vendor's group. With one vendor it is one native all-reduce.

Which library is native to which kind, and whether this host can run it, is chipfuse.devices'
table, read through runtime.launch.dist.usable_backend. On a CPU-only machine no native backend
other than gloo exists, so every group runs on gloo while keeping the layout a real pool would
use: an emulated pool that declares two vendors still gets separate vendor groups and a bridge,
which is what the tests check against a flat sum.

Written by hand: torch offers the groups and the collectives, not the choice of who talks to whom
over which library. `torch.distributed.new_group` must be called by every rank, in the same
order, for every group, even groups it is not in: build all Reducers on all ranks in one order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.devices import BRIDGE
from chipfuse.runtime.launch.dist import collective_timeout, usable_backend

__all__ = ["Reducer", "link_backend", "make_reducer"]


@dataclass(kw_only=True)
class Reducer:
    """Sums a tensor over `ranks` (global ranks), by vendor group then bridge."""

    ranks: tuple[int, ...]
    vendor_of: dict[int, str]
    backend_of: dict[str, str]
    """Vendor -> backend actually used for its group (see usable_backend)."""
    vendor_groups: dict[str, tuple[tuple[int, ...], Any]] = field(default_factory=dict)
    bridge: tuple[tuple[int, ...], Any] | None = None

    @property
    def vendors(self) -> list[str]:
        return sorted({self.vendor_of[r] for r in self.ranks})

    def build(self) -> Reducer:
        """Create the groups. Call on every rank of the job, in the same order everywhere."""
        for v in self.vendors:
            members = tuple(r for r in self.ranks if self.vendor_of[r] == v)
            self.vendor_groups[v] = (members, _new_group(members, self.backend_of[v]))
        if len(self.vendor_groups) > 1:
            leaders = tuple(m[0] for m, _ in self.vendor_groups.values())
            self.bridge = (leaders, _new_group(leaders, BRIDGE))
        return self

    def all_reduce(self, t: torch.Tensor) -> None:
        """In place: t becomes the sum of t over self.ranks. Call only on a member rank."""
        me = dist.get_rank()
        members, group = next(mg for mg in self.vendor_groups.values() if me in mg[0])
        if self.bridge is None:
            if len(members) > 1:
                dist.all_reduce(t, group=group)
            return
        leader = members[0]
        if len(members) > 1:
            dist.reduce(t, dst=leader, group=group)
        if me == leader:
            # The bridge is host memory: a chip's tensor crosses it as a CPU copy.
            host = t if t.device.type == "cpu" else t.cpu()
            dist.all_reduce(host, group=self.bridge[1])
            if host is not t:
                t.copy_(host)
        if len(members) > 1:
            dist.broadcast(t, src=leader, group=group)

    def describe(self) -> dict:
        return {
            "ranks": list(self.ranks),
            "vendor_groups": {v: {"ranks": list(m), "backend": self.backend_of[v]}
                              for v, (m, _) in self.vendor_groups.items()},
            "bridge": {"ranks": list(self.bridge[0]), "backend": BRIDGE} if self.bridge else None,
        }


def _new_group(ranks: tuple[int, ...], backend: str) -> Any:
    # A one-rank group needs no communicator; skipping it keeps start-up short. Every rank
    # takes the same decision, so the order of new_group calls stays identical everywhere.
    if len(ranks) < 2:
        return None
    return dist.new_group(list(ranks), backend=backend, timeout=collective_timeout())


def make_reducer(ranks: tuple[int, ...], vendor_of: dict[int, str], native_of: dict[str, str]) -> Reducer:
    """A Reducer over `ranks`, groups already built (collective: every rank must call it)."""
    backend_of = {v: usable_backend(native_of[v]) for v in {vendor_of[r] for r in ranks}}
    return Reducer(ranks=tuple(ranks), vendor_of=vendor_of, backend_of=backend_of).build()


def link_backend(vendors: set[str], native_of: dict[str, str]) -> str:
    """Backend for point-to-point traffic among devices of `vendors` (a pipeline's stages)."""
    if len(vendors) == 1:
        return usable_backend(native_of[next(iter(vendors))])
    return BRIDGE
