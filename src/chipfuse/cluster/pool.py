"""Pool files: nodes of devices joined by links, read from TOML and checked.

A pool file looks like::

    name = "demo"
    [[node]]
    name = "host0"
    [[node.device]]
    name = "fast"            # unique in the pool; with count = N, names fast0..fast{N-1}
    chip = "A100"            # a catalog entry (see `chipfuse pool catalog`)
    emulate = { speed = 0.5, memory_gib = 2 }   # optional: run as a slowed CPU worker
    [[link]]
    nodes = ["host0", "host1"]
    bandwidth_gbit_s = 100
    latency_ms = 0.02
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tomllib

from chipfuse.cluster.catalog import Chip, GiB, get_chip, in_catalog, load_catalog
from chipfuse.cluster.chips import pool_chips
from chipfuse.cluster.wiring import Curve, NodeWiring, bandwidth_at, parse_curve, parse_wiring
from chipfuse.devices import CPU, DeviceKind, kind_of
from chipfuse.errors import PoolError
from chipfuse.validate import Range, build

DEFAULT_INTER_NODE = {"bandwidth_gbit_s": 100.0, "latency_ms": 0.01}


@dataclass(frozen=True, kw_only=True)
class Emulation:
    """How an emulated device is rehearsed on this machine's CPU."""

    speed: float
    """Speed relative to one CPU worker thread of this machine (1.0 = unslowed)."""
    memory_bytes: int | None = None
    """Memory cap enforced on the worker; None = no cap."""


@dataclass(frozen=True, kw_only=True)
class Device:
    name: str
    chip: Chip
    node: str
    memory_bytes: int
    emulation: Emulation | None = None

    @property
    def emulated(self) -> bool:
        return self.emulation is not None

    @property
    def vendor(self) -> str:
        return self.chip.vendor

    @property
    def kind(self) -> DeviceKind:
        """Its chip's device kind (chipfuse.devices)."""
        return self.chip.kind

    @property
    def runs_as(self) -> DeviceKind:
        """The kind this device's worker really runs on: its own, or the CPU's when emulated (its
        speed is rehearsed on this host's CPU, its tensors live there)."""
        return kind_of(CPU) if self.emulated else self.kind

    @property
    def backend(self) -> str:
        """The collective library this device would use inside a group of its own kind."""
        return self.kind.backend

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Catalog peak; for an emulated device, its relative speed times the catalog figure."""
        base = self.chip.flops(dtype)
        return base * self.emulation.speed if self.emulation else base


@dataclass(frozen=True, kw_only=True)
class Link:
    a: str
    b: str
    bandwidth: float
    """Bytes/s, one direction (the large-message figure when `curve` is given)."""
    latency_s: float
    curve: Curve = ()
    """Bandwidth by message size (cluster.wiring); empty = `bandwidth` at every size."""

    def bandwidth_at(self, nbytes: float) -> float:
        return bandwidth_at(self.curve, nbytes, self.bandwidth)


@dataclass(frozen=True, kw_only=True)
class Node:
    name: str
    devices: tuple[Device, ...]
    intra_bandwidth: float
    """Bytes/s between two devices of this node (the slowest chip link among them)."""
    intra_latency_s: float = 5e-6
    wiring: NodeWiring | None = None
    """How the devices are wired (bridges, PCIe switches, peer-to-peer, NIC); None = one uniform link."""

    def group_link(self, names: tuple[str, ...] | list[str]) -> tuple[float, float]:
        """(bytes/s, latency s) of a ring over some of this node's devices (cluster.wiring)."""
        if self.wiring is None:
            return self.intra_bandwidth, self.intra_latency_s
        return self.wiring.ring(names, self.intra_latency_s)


@dataclass(frozen=True, kw_only=True)
class Pool:
    name: str
    nodes: tuple[Node, ...]
    links: tuple[Link, ...] = ()
    default_link: Link = field(
        default_factory=lambda: Link(a="*", b="*", bandwidth=100e9 / 8, latency_s=1e-5)
    )
    source: str = ""

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(d for n in self.nodes for d in n.devices)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def emulated(self) -> bool:
        return any(d.emulated for d in self.devices)

    def link(self, node_a: str, node_b: str) -> Link:
        """The link between two nodes (the node's own fast link when they are the same)."""
        if node_a == node_b:
            node = next(n for n in self.nodes if n.name == node_a)
            return Link(a=node_a, b=node_b, bandwidth=node.intra_bandwidth, latency_s=node.intra_latency_s)
        for ln in self.links:
            if {ln.a, ln.b} == {node_a, node_b}:
                return ln
        return self.default_link

    def bandwidth(self, dev_a: str, dev_b: str) -> float:
        return self.link(self.device(dev_a).node, self.device(dev_b).node).bandwidth

    def subset(self, names: list[str] | tuple[str, ...]) -> Pool:
        keep = set(names)
        nodes = tuple(
            Node(name=n.name, devices=tuple(d for d in n.devices if d.name in keep),
                 intra_bandwidth=n.intra_bandwidth, intra_latency_s=n.intra_latency_s, wiring=n.wiring)
            for n in self.nodes
        )
        return Pool(name=self.name, nodes=tuple(n for n in nodes if n.devices), links=self.links,
                    default_link=self.default_link, source=self.source)


# ----------------------------------------------------------------------------------------------
# Loading and checking


# The pool file's tables, as chipfuse.validate checks them (types, ranges, unknown keys).
_Gbit = Annotated[float, Range(0, 1e7, above=True)]
_Gib = Annotated[float, Range(0, 1e7, above=True)]
_Delay = Annotated[float, Range(0, 1e6)]
MAX_DEVICES = 1 << 16
"""Devices in one pool, counts expanded: more is a typo (count = 2**63), not a cluster to plan."""


@dataclass(frozen=True, kw_only=True)
class _EmulateTable:
    speed: Annotated[float, Range(0, 1e6, above=True)]
    memory_gib: _Gib | None = None


@dataclass(frozen=True, kw_only=True)
class _DeviceTable:
    name: str
    chip: str
    count: Annotated[int, Range(1, MAX_DEVICES)] = 1
    memory_gib: _Gib | None = None
    emulate: _EmulateTable | None = None


@dataclass(frozen=True, kw_only=True)
class _DefaultLinkTable:
    bandwidth_gbit_s: _Gbit
    latency_ms: _Delay = 0.0
    by_size: Any = None
    """[[message bytes, Gbit/s], ...], checked by cluster.wiring.parse_curve."""


@dataclass(frozen=True, kw_only=True)
class _LinkTable(_DefaultLinkTable):
    nodes: tuple[str, str]


@dataclass(frozen=True, kw_only=True)
class _NodeTable:
    name: str
    device: tuple[_DeviceTable, ...]
    intra_gbs: _Gbit | None = None
    intra_latency_us: _Delay = 5.0
    wiring: Any = None
    """Checked by cluster.wiring.parse_wiring against the node's devices."""


@dataclass(frozen=True, kw_only=True)
class _PoolTable:
    name: str = ""
    description: str = ""
    node: tuple[_NodeTable, ...]
    link: tuple[_LinkTable, ...] = ()
    default_link: _DefaultLinkTable = _DefaultLinkTable(**DEFAULT_INTER_NODE)
    chip: Any = None
    """`[[chip]]` tables, checked by cluster.chips.pool_chips."""


def pool_from_dict(raw: dict, source: str = "<pool>") -> Pool:
    """Build and check a pool from the parsed TOML. Errors name `source`, the field and the fix."""

    def fail(where: str, problem: str, fix: str) -> PoolError:
        return PoolError(f"{source}: {where}: {problem}. Fix: {fix}")

    if isinstance(raw, dict) and not raw.get("node"):
        raise fail("node", "no [[node]] table", 'add at least one `[[node]]` with `name = "..."` and a `[[node.device]]`')
    table = build(_PoolTable, raw, source=source, error=PoolError)
    own_chips = pool_chips(table.chip, fail, in_catalog)  # [[chip]] tables (cluster.chips)
    seen: set[str] = set()
    node_names: set[str] = set()
    nodes = []
    for i, n in enumerate(table.node):
        where = f"node[{i}]"
        if n.name in node_names:
            raise fail(f"{where}.name", f"duplicate node name {n.name!r}", "give every node its own name")
        node_names.add(n.name)
        if not n.device:
            raise fail(f"{where}.device", "node has no devices", "add `[[node.device]]` tables under it")
        devices: list[Device] = []
        for j, d in enumerate(n.device):
            dwhere = f"{where}.device[{j}]"
            try:
                chip = own_chips[d.chip] if d.chip in own_chips else get_chip(d.chip)
            except KeyError:
                raise fail(f"{dwhere}.chip", f"unknown chip {d.chip!r}",
                           f"declare it in a [[chip]] table or use a catalog name: "
                           f"{', '.join([*own_chips, *load_catalog()])}") from None
            if len(seen) + d.count > MAX_DEVICES:
                raise fail(f"{dwhere}.count", f"{d.count} makes more than {MAX_DEVICES} devices in the pool",
                           "lower the count")
            mem = int((d.memory_gib if d.memory_gib is not None else chip.memory_bytes / GiB) * GiB)
            emu = None
            if d.emulate is not None:
                cap = int(d.emulate.memory_gib * GiB) if d.emulate.memory_gib is not None else None
                emu = Emulation(speed=d.emulate.speed, memory_bytes=cap)
                mem = cap if cap is not None else mem
            names = [d.name] if d.count == 1 else [f"{d.name}{k}" for k in range(d.count)]
            for nm in names:
                if nm in seen:
                    raise fail(f"{dwhere}.name", f"duplicate device name {nm!r}", "give every device its own name")
                seen.add(nm)
                devices.append(Device(name=nm, chip=chip, node=n.name, memory_bytes=mem, emulation=emu))
        wiring = parse_wiring(n.wiring, [dv.name for dv in devices], f"{where}.wiring", fail)
        intra_lat = n.intra_latency_us / 1e6
        intra = (n.intra_gbs * 1e9 if n.intra_gbs is not None
                 else wiring.ring([dv.name for dv in devices], intra_lat)[0] if wiring and len(devices) > 1
                 else min(dv.chip.link_bw for dv in devices))
        nodes.append(Node(name=n.name, devices=tuple(devices), intra_bandwidth=intra, intra_latency_s=intra_lat,
                          wiring=wiring))
    links = []
    for i, ln in enumerate(table.link):
        for e in ln.nodes:
            if e not in node_names:
                raise fail(f"link[{i}].nodes", f"unknown node {e!r}", f"use one of {sorted(node_names)}")
        links.append(_link(ln, *ln.nodes, fail, f"link[{i}]"))
    return Pool(name=table.name or Path(source).stem, nodes=tuple(nodes), links=tuple(links),
                default_link=_link(table.default_link, "*", "*", fail, "default_link"), source=source)


def _link(t: _DefaultLinkTable, a: str, b: str, fail: Any, where: str) -> Link:
    curve = parse_curve(t.by_size, f"{where}.by_size", fail) if t.by_size is not None else ()
    return Link(a=a, b=b, bandwidth=t.bandwidth_gbit_s * 1e9 / 8, latency_s=t.latency_ms / 1e3, curve=curve)


def load_pool(path: str | Path) -> Pool:
    p = Path(path)
    if not p.exists():
        raise PoolError(f"{p}: no such pool file. Fix: give the path of a pool TOML (see examples/)")
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as e:
        raise PoolError(f"{p}: cannot read ({e.strerror}). Fix: give the path of a pool TOML (see examples/)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PoolError(f"{p}: not valid TOML ({e}). Fix: correct the syntax at that line") from None
    return pool_from_dict(raw, source=str(p))


def pool_to_dict(pool: Pool) -> dict:
    """A JSON-friendly description (for --json outputs and plan files)."""
    return {
        "name": pool.name,
        "emulated": pool.emulated,
        "devices": [
            {"name": d.name, "chip": d.chip.name, "vendor": d.vendor, "node": d.node,
             "memory_bytes": d.memory_bytes, "peak_flops_bf16": d.peak_flops("bf16"),
             "emulated": d.emulated, "speed": d.emulation.speed if d.emulation else None,
             "backend": d.backend}
            for d in pool.devices
        ],
        "links": [{"a": ln.a, "b": ln.b, "bandwidth_bytes_s": ln.bandwidth, "latency_s": ln.latency_s}
                  for ln in pool.links],
    }
