"""Device rates and link costs the cost model is built on: catalog peaks through the kernel model
(plan.kernels), or a measured Profile.

A device computes in the plan's dtype where its chip has it: a chip without bf16 (V100, T4, Turing
cards) runs a bf16 plan in fp32, as the runtime does (plan.memory.compute_dtype), and an fp16 plan on
its fp16 tensor cores. Its sustained rate (for ranking devices and dealing shares) is peak x the
kernel model's large-GEMM efficiency for that dtype; block times come from plan.kernels.

Collectives (bytes B, n participants, link bandwidth bw, latency lat):
  point-to-point  lat + B / bw
  ring all-reduce 2 (n-1)/n * B / bw + 2 (n-1) lat   (reduce-scatter, all-gather: half of it)
Links inside a node follow its wiring (cluster.wiring: bridges, PCIe switches shared, peer-to-peer
or not); between nodes, the link (its bandwidth at the message size when it gives one) capped by
each node's NIC.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.cluster.pool import Device, Pool
from chipfuse.cluster.wiring import bandwidth_at
from chipfuse.plan.kernels import ChipRates, sustained_fraction
from chipfuse.plan.memory import compute_dtype
from chipfuse.plan.profile import LayerTiming, Profile

TOKENS_HALF = 128
"""With a measured rate (profile) only: tokens per micro-batch at which a chip reaches half of it."""
BLOCK_LAUNCH_S = 20e-6
"""With a measured rate only: fixed cost of one block's forward; backward twice that."""
HOST_LINK_BW = 25e9
"""Bytes/s between a device and host memory (PCIe Gen4 x16, effective) for offload."""
CPU_ADAM_PARAMS_S = 1e9
"""Parameters per second a host CPU updates with Adam (offloaded optimizer)."""


def device_dtype(device: Device, dtype: str) -> str:
    """The dtype a device really computes a plan's `dtype` in (see the module docstring)."""
    return compute_dtype(dtype, device.chip)


def chip_rates(device: Device, dtype: str) -> ChipRates:
    """Peak and memory bandwidth in the device's compute dtype (an emulated device: scaled by its speed)."""
    speed = device.emulation.speed if device.emulation else 1.0
    return ChipRates(peak_flops=device.peak_flops(device_dtype(device, dtype)), mem_bw=device.chip.mem_bw * speed,
                     tensor_cores=device.chip.tensor_cores, nvidia=device.kind.kernel_reference)


def efficiency(device: Device, dtype: str) -> float:
    """Sustained fraction of peak on large blocks (plan.kernels), in the device's compute dtype."""
    return sustained_fraction(chip_rates(device, dtype), device_dtype(device, dtype))


def sustained_flops(device: Device, dtype: str, profile: Profile | None = None) -> float:
    """Measured FLOP/s when the profile has it, else peak (x emulation speed) x efficiency."""
    if profile is not None:
        got = profile.sustained_flops(device.name, dtype)
        if got:
            return got
    return device.peak_flops(device_dtype(device, dtype)) * efficiency(device, dtype)


@dataclass(frozen=True, kw_only=True)
class GroupHW:
    """What the cost model needs to know of one stage group's devices (the slowest one rules)."""

    flops: float
    """Sustained FLOP/s of the slowest device, in the plan's dtype."""
    mem_bw: float
    memory_bytes: int
    intra_bw: float
    """Node link used by tensor parallelism and sharding inside the group."""
    intra_lat: float
    layer_times: tuple[LayerTiming, ...] = ()
    """Measured block timings of the slowest device, if profiled."""
    gemm_curve: tuple[tuple[float, float], ...] = ()
    """Measured GEMM FLOP/s by size of the slowest device, if profiled (scales measured block times)."""
    peak_flops: float = 0.0
    """Catalog peak of one device (the MFU denominator)."""
    chip: ChipRates | None = None
    """Peaks for the kernel model; None when a profile measured the device's rate (then flops rules)."""
    emulated: bool = False
    """Any device of the group emulated (memory caps are exact there: plan.memory.usable)."""
    dtype: str = "bf16"
    """What the slowest device computes in (a bf16 plan on a chip without bf16: fp32)."""


class PoolIndex:
    """Fast look-ups into a pool (devices, nodes, links, group rates), cached for one plan or search."""

    def __init__(self, pool: Pool, profile: Profile | None = None, dtype: str = "bf16"):
        self.pool, self.profile, self.dtype = pool, profile, dtype
        self.dev = {d.name: d for d in pool.devices}
        self.node = {n.name: n for n in pool.nodes}
        self._hw: dict[tuple[str, ...], GroupHW] = {}
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        self._slowest: dict[frozenset[str], tuple[float, float]] = {}

    def rate(self, name: str) -> float:
        return sustained_flops(self.dev[name], self.dtype, self.profile)

    def hw(self, names: tuple[str, ...]) -> GroupHW:
        got = self._hw.get(names)
        if got is None:
            devs = [self.dev[n] for n in names]
            slow = min(devs, key=lambda d: sustained_flops(d, self.dtype, self.profile))
            nodes = frozenset(d.node for d in devs)
            # A group spread over nodes (hand-written plans) talks over the slowest link among them.
            bw, lat = self.group_link(names) if len(nodes) == 1 else self.slowest(nodes)
            timings = self.profile.layer_times.get(slow.name, ()) if self.profile else ()
            measured = self.profile is not None and self.profile.sustained_flops(slow.name, self.dtype)
            got = GroupHW(flops=sustained_flops(slow, self.dtype, self.profile),
                          mem_bw=min(d.chip.mem_bw for d in devs), memory_bytes=min(d.memory_bytes for d in devs),
                          intra_bw=bw, intra_lat=lat, layer_times=tuple(timings),
                          gemm_curve=self.profile.gemm.get(slow.name, ()) if self.profile else (),
                          peak_flops=slow.peak_flops(device_dtype(slow, self.dtype)),
                          chip=None if measured else chip_rates(slow, self.dtype),
                          dtype=device_dtype(slow, self.dtype), emulated=any(d.emulated for d in devs))
            self._hw[names] = got
        return got

    def link(self, node_a: str, node_b: str, nbytes: float = 0.0) -> tuple[float, float]:
        """(bytes/s, latency s) between two nodes; `nbytes` picks a size-dependent link's figure."""
        if nbytes:
            return link_between(self.pool, node_a, node_b, self.profile, nbytes)
        key = (node_a, node_b)
        got = self._links.get(key)
        if got is None:
            got = self._links[key] = link_between(self.pool, node_a, node_b, self.profile)
        return got

    def group_link(self, names: tuple[str, ...]) -> tuple[float, float]:
        """A ring over devices of one node: measured node link if profiled, else the node's wiring."""
        node = self.dev[names[0]].node
        if self.profile is not None and self.profile.link(node, node):
            return self.link(node, node)
        return self.node[node].group_link(names)

    def slowest(self, nodes: frozenset[str]) -> tuple[float, float]:
        got = self._slowest.get(nodes)
        if got is None:
            got = self._slowest[nodes] = slowest_link(self.pool, set(nodes), self.profile)
        return got


def link_between(pool: Pool, node_a: str, node_b: str, profile: Profile | None = None,
                 nbytes: float = 0.0) -> tuple[float, float]:
    """(bytes/s, latency s) between two nodes, measured if the profile has it. Between two nodes the
    link is also capped by each node's NIC (cluster.wiring); `nbytes` reads a size-dependent link."""
    if profile is not None and (m := profile.link(node_a, node_b)):
        return (bandwidth_at(m.curve, nbytes, m.bandwidth) if nbytes else m.bandwidth), m.latency_s
    ln = pool.link(node_a, node_b)
    bw = ln.bandwidth_at(nbytes) if nbytes else ln.bandwidth
    if node_a != node_b:
        for n in (node_a, node_b):
            w = next(x for x in pool.nodes if x.name == n).wiring
            if w is not None and w.nic_bw is not None:
                bw = min(bw, w.nic_bw)
    return bw, ln.latency_s


def slowest_link(pool: Pool, nodes: set[str], profile: Profile | None = None) -> tuple[float, float]:
    """The slowest link among a set of distinct nodes (a ring over them is as fast as that link)."""
    ns = sorted(nodes)
    if len(ns) < 2:
        return float("inf"), 0.0
    worst_bw, worst_lat = float("inf"), 0.0
    pairs = len(ns) * (len(ns) - 1) // 2
    # The default link applies as soon as some pair has no explicit link: that is cheap to check.
    covered = sum(1 for ln in pool.links if ln.a in nodes and ln.b in nodes and ln.a != ln.b)
    if covered < pairs:
        worst_bw, worst_lat = pool.default_link.bandwidth, pool.default_link.latency_s
    for ln in pool.links:
        if ln.a != ln.b and ln.a in nodes and ln.b in nodes:
            bw, lat = link_between(pool, ln.a, ln.b, profile)
            worst_bw, worst_lat = min(worst_bw, bw), max(worst_lat, lat)
    return worst_bw, worst_lat


def p2p_s(nbytes: float, bw: float, lat: float) -> float:
    return lat + nbytes / bw if nbytes else 0.0


def ring_allreduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    if n <= 1 or not nbytes:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def half_ring_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Reduce-scatter or all-gather: half a ring all-reduce."""
    return ring_allreduce_s(nbytes, n, bw, lat) / 2
