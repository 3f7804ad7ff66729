"""Device rates and link costs the cost model is built on: catalog x efficiency, or a measured Profile.

Default efficiencies (sustained / dense peak on transformer blocks; replace them with a Profile):

| chips                                             | bf16/fp16 | fp32 |
| NVIDIA data-centre (H100, H800, H20, A100, A800, V100, L40S) | 0.45 | 0.60 |
| NVIDIA PCIe / consumer (T4, L4, RTX)              | 0.35      | 0.60 |
| AMD, Huawei, Intel accelerators                   | 0.35      | 0.50 |
| Kunlunxin, Cambricon                              | 0.30      | 0.50 |
| CPU (the catalog figure is a server estimate)     | 0.50      | 0.50 |

0.45 is about what Megatron-LM reports on A100/H100 for GPT models at scale (MFU 40-50 %);
the others are discounted for PCIe-only cards and younger software stacks. A micro-batch of
few tokens keeps kernels small: efficiency is scaled by tokens / (tokens + 128).

Collectives (bytes B, n participants, link bandwidth bw, latency lat):
  point-to-point  lat + B / bw
  ring all-reduce 2 (n-1)/n * B / bw + 2 (n-1) lat   (reduce-scatter, all-gather: half of it)
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.cluster.pool import Device, Pool
from chipfuse.plan.profile import LayerTiming, Profile

CONSUMER = ("T4", "L4", "RTX")
DATACENTER_EFF = {"bf16": 0.45, "fp32": 0.60}
VENDOR_EFF = {
    "amd": {"bf16": 0.35, "fp32": 0.50},
    "huawei": {"bf16": 0.35, "fp32": 0.50},
    "intel": {"bf16": 0.35, "fp32": 0.50},
    "kunlunxin": {"bf16": 0.30, "fp32": 0.50},
    "cambricon": {"bf16": 0.30, "fp32": 0.50},
    "cpu": {"bf16": 0.50, "fp32": 0.50},
}
TOKENS_HALF = 128
"""Tokens per micro-batch at which a chip reaches half its sustained rate."""
BLOCK_LAUNCH_S = 20e-6
"""Fixed cost of one block's forward (kernel launches); backward costs twice that."""
HOST_LINK_BW = 25e9
"""Bytes/s between a device and host memory (PCIe Gen4 x16, effective) for offload."""
CPU_ADAM_PARAMS_S = 1e9
"""Parameters per second a host CPU updates with Adam (offloaded optimizer)."""


def efficiency(device: Device, dtype: str) -> float:
    dt = "fp32" if dtype == "fp32" else "bf16"
    if device.vendor == "nvidia":
        if dt == "bf16" and any(device.chip.name.startswith(c) for c in CONSUMER):
            return 0.35
        return DATACENTER_EFF[dt]
    return VENDOR_EFF.get(device.vendor, {"bf16": 0.30, "fp32": 0.50})[dt]


def sustained_flops(device: Device, dtype: str, profile: Profile | None = None) -> float:
    """Measured FLOP/s when the profile has it, else peak (x emulation speed) x efficiency."""
    if profile is not None:
        got = profile.sustained_flops(device.name, dtype)
        if got:
            return got
    return device.peak_flops(dtype) * efficiency(device, dtype)


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
    peak_flops: float = 0.0
    """Catalog peak of one device (the MFU denominator)."""


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
            bw, lat = self.link(slow.node, slow.node) if len(nodes) == 1 else self.slowest(nodes)
            timings = self.profile.layer_times.get(slow.name, ()) if self.profile else ()
            got = GroupHW(flops=sustained_flops(slow, self.dtype, self.profile),
                          mem_bw=min(d.chip.mem_bw for d in devs), memory_bytes=min(d.memory_bytes for d in devs),
                          intra_bw=bw, intra_lat=lat, layer_times=tuple(timings),
                          peak_flops=slow.peak_flops(self.dtype))
            self._hw[names] = got
        return got

    def link(self, node_a: str, node_b: str) -> tuple[float, float]:
        key = (node_a, node_b)
        got = self._links.get(key)
        if got is None:
            got = self._links[key] = link_between(self.pool, node_a, node_b, self.profile)
        return got

    def slowest(self, nodes: frozenset[str]) -> tuple[float, float]:
        got = self._slowest.get(nodes)
        if got is None:
            got = self._slowest[nodes] = slowest_link(self.pool, set(nodes), self.profile)
        return got


def link_between(pool: Pool, node_a: str, node_b: str, profile: Profile | None = None) -> tuple[float, float]:
    """(bytes/s, latency s) between two nodes, measured if the profile has it."""
    if profile is not None and (m := profile.link(node_a, node_b)):
        return m.bandwidth, m.latency_s
    ln = pool.link(node_a, node_b)
    return ln.bandwidth, ln.latency_s


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
