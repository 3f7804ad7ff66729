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
from typing import Any

import tomllib

from chipfuse.cluster.catalog import Chip, GiB, get_chip, in_catalog, load_catalog
from chipfuse.cluster.chips import pool_chips
from chipfuse.cluster.wiring import Curve, NodeWiring, bandwidth_at, parse_curve, parse_wiring
from chipfuse.errors import PoolError

# Native collective library per vendor. Chips of different vendors never share one.
NATIVE_BACKEND = {
    "nvidia": "nccl",
    "amd": "nccl",  # RCCL answers to the "nccl" name in ROCm builds of torch
    "huawei": "hccl",
    "intel": "hccl",
    "kunlunxin": "bkcl",
    "cambricon": "cncl",
    "cpu": "gloo",
}

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
    def backend(self) -> str:
        """The collective library this device would use inside a group of its own kind."""
        return NATIVE_BACKEND.get(self.vendor, "gloo")

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


class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> PoolError:
        return PoolError(f"{self.source}: {where}: {problem}. Fix: {fix}")


def _number(ctx: _Ctx, d: dict, key: str, where: str, *, positive: bool = True, default: Any = None) -> float:
    if key not in d:
        if default is not None:
            return default
        raise ctx.fail(f"{where}.{key}", "missing", f"add `{key} = <number>`")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.fail(f"{where}.{key}", f"is {v!r}, not a number", f"write `{key} = <number>`")
    if positive and v <= 0:
        raise ctx.fail(f"{where}.{key}", f"is {v}, must be positive", f"give `{key}` a value above 0")
    return float(v)


def _str(ctx: _Ctx, d: dict, key: str, where: str) -> str:
    if key not in d:
        raise ctx.fail(f"{where}.{key}", "missing", f'add `{key} = "..."`')
    if not isinstance(d[key], str) or not d[key]:
        raise ctx.fail(f"{where}.{key}", f"is {d[key]!r}, not a non-empty string", f'write `{key} = "..."`')
    return d[key]


_NODE_KEYS = {"name", "device", "intra_gbs", "intra_latency_us", "wiring"}
_DEVICE_KEYS = {"name", "chip", "count", "memory_gib", "emulate"}
_EMULATE_KEYS = {"speed", "memory_gib"}
_LINK_KEYS = {"nodes", "bandwidth_gbit_s", "latency_ms", "by_size"}
_TOP_KEYS = {"name", "node", "link", "default_link", "description", "chip"}


def _unknown(ctx: _Ctx, d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ctx.fail(f"{where}.{extra[0]}", "unknown field", f"use one of {sorted(allowed)}")


def _link(ctx: _Ctx, raw: dict, where: str, a: str, b: str) -> Link:
    _unknown(ctx, raw, _LINK_KEYS, where)
    bw = _number(ctx, raw, "bandwidth_gbit_s", where)
    lat = _number(ctx, raw, "latency_ms", where, positive=False, default=0.0)
    if lat < 0:
        raise ctx.fail(f"{where}.latency_ms", f"is {lat}, must not be negative", "give a latency of 0 or more")
    curve = parse_curve(raw["by_size"], f"{where}.by_size", ctx.fail) if "by_size" in raw else ()
    return Link(a=a, b=b, bandwidth=bw * 1e9 / 8, latency_s=lat / 1e3, curve=curve)


def pool_from_dict(raw: dict, source: str = "<pool>") -> Pool:
    """Build and check a pool from the parsed TOML. Errors name `source`, the field and the fix."""
    ctx = _Ctx(source)
    _unknown(ctx, raw, _TOP_KEYS, "pool")
    nodes_raw = raw.get("node")
    if not nodes_raw or not isinstance(nodes_raw, list):
        raise ctx.fail("node", "no [[node]] table", 'add at least one `[[node]]` with `name = "..."` and a `[[node.device]]`')
    own_chips = pool_chips(raw.get("chip"), ctx.fail, in_catalog)  # [[chip]] tables (cluster.chips)
    seen: set[str] = set()
    node_names: set[str] = set()
    nodes = []
    for i, n in enumerate(nodes_raw):
        where = f"node[{i}]"
        _unknown(ctx, n, _NODE_KEYS, where)
        nname = _str(ctx, n, "name", where)
        if nname in node_names:
            raise ctx.fail(f"{where}.name", f"duplicate node name {nname!r}", "give every node its own name")
        node_names.add(nname)
        devs_raw = n.get("device")
        if not devs_raw or not isinstance(devs_raw, list):
            raise ctx.fail(f"{where}.device", "node has no devices", "add `[[node.device]]` tables under it")
        devices: list[Device] = []
        for j, d in enumerate(devs_raw):
            dwhere = f"{where}.device[{j}]"
            _unknown(ctx, d, _DEVICE_KEYS, dwhere)
            dname = _str(ctx, d, "name", dwhere)
            chip_name = _str(ctx, d, "chip", dwhere)
            try:
                chip = own_chips[chip_name] if chip_name in own_chips else get_chip(chip_name)
            except KeyError:
                raise ctx.fail(f"{dwhere}.chip", f"unknown chip {chip_name!r}",
                               f"declare it in a [[chip]] table or use a catalog name: "
                               f"{', '.join([*own_chips, *load_catalog()])}") from None
            count = int(_number(ctx, d, "count", dwhere, default=1))
            mem = int(_number(ctx, d, "memory_gib", dwhere, default=chip.memory_bytes / GiB) * GiB)
            emu = None
            if "emulate" in d:
                e = d["emulate"]
                ewhere = f"{dwhere}.emulate"
                if not isinstance(e, dict):
                    raise ctx.fail(ewhere, "is not a table", "write `emulate = { speed = 0.5, memory_gib = 2 }`")
                _unknown(ctx, e, _EMULATE_KEYS, ewhere)
                speed = _number(ctx, e, "speed", ewhere)
                cap = int(_number(ctx, e, "memory_gib", ewhere) * GiB) if "memory_gib" in e else None
                emu = Emulation(speed=speed, memory_bytes=cap)
                if cap is not None:
                    mem = cap
            names = [dname] if count == 1 else [f"{dname}{k}" for k in range(count)]
            for nm in names:
                if nm in seen:
                    raise ctx.fail(f"{dwhere}.name", f"duplicate device name {nm!r}", "give every device its own name")
                seen.add(nm)
                devices.append(Device(name=nm, chip=chip, node=nname, memory_bytes=mem, emulation=emu))
        wiring = parse_wiring(n.get("wiring"), [dv.name for dv in devices], f"{where}.wiring", ctx.fail)
        intra_lat = n.get("intra_latency_us", 5.0) / 1e6
        intra = (n["intra_gbs"] * 1e9 if "intra_gbs" in n
                 else wiring.ring([dv.name for dv in devices], intra_lat)[0] if wiring and len(devices) > 1
                 else min(dv.chip.link_bw for dv in devices))
        nodes.append(Node(name=nname, devices=tuple(devices), intra_bandwidth=intra, intra_latency_s=intra_lat,
                          wiring=wiring))
    links = []
    for i, ln in enumerate(raw.get("link", [])):
        where = f"link[{i}]"
        ends = ln.get("nodes")
        if not (isinstance(ends, list) and len(ends) == 2):
            raise ctx.fail(f"{where}.nodes", "must name two nodes", 'write `nodes = ["host0", "host1"]`')
        for e in ends:
            if e not in node_names:
                raise ctx.fail(f"{where}.nodes", f"unknown node {e!r}", f"use one of {sorted(node_names)}")
        links.append(_link(ctx, ln, where, ends[0], ends[1]))
    dl = _link(ctx, raw.get("default_link", DEFAULT_INTER_NODE), "default_link", "*", "*")
    return Pool(name=str(raw.get("name", Path(source).stem)), nodes=tuple(nodes), links=tuple(links),
                default_link=dl, source=source)


def load_pool(path: str | Path) -> Pool:
    p = Path(path)
    if not p.exists():
        raise PoolError(f"{p}: no such pool file. Fix: give the path of a pool TOML (see examples/)")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
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
