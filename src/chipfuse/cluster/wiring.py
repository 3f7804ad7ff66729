"""How a node's devices are wired, and links whose speed depends on the message size.

A node may say (all optional)::

    [node.wiring]
    pcie_gen = 3                              # PCIe generation of the slots: 3, 4, 5 or 6 (x16)
    p2p = false                               # peer-to-peer over PCIe (false: copies bounce through host memory)
    bridges = [["g0", "g1"], ["g2", "g3"]]    # NVLink / bridge pairs
    bridge_gbs = 50                           # one direction, per bridge
    switches = [["g0", "g1", "g2", "g3"], ["g4", "g5", "g6", "g7"]]   # devices behind one PCIe switch
    nic_gbit_s = 25                           # the node's network card, shared by all its devices

and a link (or the default link) may give its bandwidth by message size::

    [[link]]
    nodes = ["a", "b"]
    bandwidth_gbit_s = 10                     # the large-message figure
    by_size = [[65536, 2.0], [1048576, 7.5], [67108864, 9.4]]   # [message bytes, Gbit/s]

The ring model inside a node (what tensor parallelism, sharding and the in-node gradient ring use):
devices are put in a ring with bridged pairs next to each other; an edge between bridged devices
runs at `bridge_gbs`; any other edge crosses PCIe at PCIE_GBS[gen], or, without peer-to-peer, through
host memory at NO_P2P_FACTOR of it with NO_P2P_LATENCY_S more latency. Edges whose traffic leaves a
PCIe switch share that switch's one x16 uplink (without peer-to-peer, every non-bridged edge does);
a device outside any switch has its own x16 link. A ring is as fast as its slowest edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PCIE_GBS = {3: 12.0, 4: 24.0, 5: 48.0, 6: 96.0}
"""Effective one-direction bandwidth of an x16 slot, GB/s (about 75% of the raw lane rate, what
NCCL's bus bandwidth reaches on PCIe)."""
NO_P2P_FACTOR = 0.5
"""Without peer-to-peer a copy is staged in host memory: two PCIe crossings and a host memcpy."""
NO_P2P_LATENCY_S = 10e-6
WIRING_FIELDS = frozenset({"pcie_gen", "p2p", "bridges", "bridge_gbs", "switches", "nic_gbit_s"})

Fail = Callable[[str, str, str], Exception]


@dataclass(frozen=True, kw_only=True)
class NodeWiring:
    pcie_gen: int = 4
    p2p: bool = True
    bridges: tuple[tuple[str, str], ...] = ()
    bridge_bw: float = 0.0
    """Bytes/s, one direction, of one bridge."""
    switches: tuple[tuple[str, ...], ...] = ()
    nic_bw: float | None = None
    """Bytes/s of the node's NIC, shared by every device's traffic off the node; None = no limit given."""

    @property
    def pcie_bw(self) -> float:
        return PCIE_GBS[self.pcie_gen] * 1e9

    def _switch_of(self, dev: str) -> int | None:
        for k, members in enumerate(self.switches):
            if dev in members:
                return k
        return None

    def _bridged(self, a: str, b: str) -> bool:
        return (a, b) in self.bridges or (b, a) in self.bridges

    def ring_order(self, devices: Sequence[str]) -> list[str]:
        """Bridged partners next to each other, then devices of one switch together."""
        left = list(devices)
        order: list[str] = []
        key = {d: (self._switch_of(d) if self._switch_of(d) is not None else -1, i) for i, d in enumerate(devices)}
        left.sort(key=lambda d: key[d])
        while left:
            d = left.pop(0)
            order.append(d)
            mate = next((e for e in left if self._bridged(d, e)), None)
            if mate is not None:
                left.remove(mate)
                order.append(mate)
        return order

    def ring(self, devices: Sequence[str], base_latency_s: float) -> tuple[float, float]:
        """(bytes/s, latency s) of a ring over `devices` of this node (module docstring)."""
        if len(devices) < 2:
            return float("inf"), 0.0
        order = self.ring_order(devices)
        edges = list(zip(order, order[1:] + order[:1], strict=True)) if len(order) > 2 else [(order[0], order[1])]
        leaving: dict[object, int] = {}
        pcie_edges = []
        for a, b in edges:
            if self._bridged(a, b):
                continue
            sa, sb = self._switch_of(a), self._switch_of(b)
            up = sa if sa is not None else ("own", a)
            if not self.p2p or sa is None or sa != sb:  # traffic leaves the sender's switch (or own slot)
                leaving[up] = leaving.get(up, 0) + 1
            pcie_edges.append((a, up, not self.p2p or sa is None or sa != sb))
        bw = self.bridge_bw if len(pcie_edges) < len(edges) else float("inf")
        lat = base_latency_s
        for _a, up, leaves in pcie_edges:
            edge = self.pcie_bw * (NO_P2P_FACTOR if not self.p2p else 1.0)
            if leaves:
                edge /= leaving[up]
            bw = min(bw, edge)
        if pcie_edges and not self.p2p:
            lat += NO_P2P_LATENCY_S
        return bw, lat


def parse_wiring(raw: Any, device_names: Sequence[str], where: str, fail: Fail) -> NodeWiring | None:
    """Check a node's `wiring` table against its devices; None when the node has none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise fail(where, f"is {raw!r}, not a table", "write `[node.wiring]` with pcie_gen, p2p, bridges, ...")
    extra = sorted(set(raw) - WIRING_FIELDS)
    if extra:
        raise fail(f"{where}.{extra[0]}", "unknown field", f"use one of {sorted(WIRING_FIELDS)}")
    gen = raw.get("pcie_gen", 4)
    if isinstance(gen, bool) or gen not in PCIE_GBS:
        raise fail(f"{where}.pcie_gen", f"is {gen!r}", f"use one of {sorted(PCIE_GBS)}")
    p2p = raw.get("p2p", True)
    if not isinstance(p2p, bool):
        raise fail(f"{where}.p2p", f"is {p2p!r}, not true or false", "write `p2p = true` or `p2p = false`")
    known = set(device_names)

    def groups(key: str, size: int | None) -> tuple[tuple[str, ...], ...]:
        val = raw.get(key, [])
        shape = '[["g0", "g1"], ["g2", "g3"]]'
        if not isinstance(val, list) or not all(isinstance(g, list) for g in val):
            raise fail(f"{where}.{key}", f"is {val!r}, not a list of device lists", f"write `{key} = {shape}`")
        used: set[str] = set()
        for g in val:
            if size is not None and len(g) != size:
                raise fail(f"{where}.{key}", f"{g!r} has {len(g)} devices, a bridge joins two",
                           f"write pairs: `{key} = {shape}`")
            for d in g:
                if not isinstance(d, str):
                    raise fail(f"{where}.{key}", f"{g!r} holds {d!r}, not a device name",
                               f"name devices as strings: `{key} = {shape}`")
                if d not in known:
                    raise fail(f"{where}.{key}", f"unknown device {d!r} (this node has {sorted(known)})",
                               "name devices of this node as they are expanded (count = 2 gives g0, g1)")
                if d in used:
                    raise fail(f"{where}.{key}", f"device {d!r} appears twice", "list each device at most once")
                used.add(d)
        return tuple(tuple(g) for g in val)

    bridges = groups("bridges", 2)
    bridge_bw = 0.0
    if bridges:
        v = raw.get("bridge_gbs")
        if v is None:
            raise fail(f"{where}.bridge_gbs", "missing while bridges are given",
                       "add `bridge_gbs = <GB/s one direction>` (e.g. 50 for a 2080 Ti NVLink bridge)")
        bridge_bw = _positive(v, f"{where}.bridge_gbs", fail) * 1e9
    elif "bridge_gbs" in raw:
        raise fail(f"{where}.bridge_gbs", "given without bridges", 'add `bridges = [["g0", "g1"]]` or remove it')
    switches = groups("switches", None)
    nic = raw.get("nic_gbit_s")
    nic_bw = None if nic is None else _positive(nic, f"{where}.nic_gbit_s", fail) * 1e9 / 8
    return NodeWiring(pcie_gen=int(gen), p2p=p2p, bridges=tuple((a, b) for a, b in bridges), bridge_bw=bridge_bw,
                      switches=switches, nic_bw=nic_bw)


def _positive(v: Any, where: str, fail: Fail) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
        raise fail(where, f"is {v!r}, must be a positive number", "give a number above 0")
    return float(v)


# ---------------------------------------------------------------------------------------------- by size
Curve = tuple[tuple[float, float], ...]
"""(message bytes, bytes/s) points, sorted by size."""


def parse_curve(raw: Any, where: str, fail: Fail) -> Curve:
    """A link's `by_size = [[bytes, gbit_s], ...]`: at least two points, sizes increasing."""
    fix = "write `by_size = [[65536, 2.0], [67108864, 9.4]]` ([message bytes, Gbit/s], sizes increasing)"
    if not isinstance(raw, list) or len(raw) < 2:
        raise fail(where, f"is {raw!r}, needs at least two [bytes, Gbit/s] points", fix)
    out: list[tuple[float, float]] = []
    for k, pt in enumerate(raw):
        if not (isinstance(pt, list) and len(pt) == 2):
            raise fail(f"{where}[{k}]", f"is {pt!r}, not a [bytes, Gbit/s] pair", fix)
        size = _positive(pt[0], f"{where}[{k}][0]", fail)
        gbit = _positive(pt[1], f"{where}[{k}][1]", fail)
        if out and size <= out[-1][0]:
            raise fail(f"{where}[{k}][0]", f"{size:g} bytes is not above the previous point's {out[-1][0]:g}", fix)
        out.append((size, gbit * 1e9 / 8))
    return tuple(out)


def bandwidth_at(curve: Curve, nbytes: float, default: float) -> float:
    """Bytes/s for a message of `nbytes`: log-linear between points, flat beyond them."""
    if not curve or nbytes <= 0:
        return default
    return log_interp(curve, nbytes)


def log_interp(curve: Curve, x: float) -> float:
    """y at `x` on a curve of (x, y) points sorted by x: linear in log x between points, flat beyond."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return curve[-1][1]
