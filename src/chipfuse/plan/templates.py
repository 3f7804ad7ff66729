"""What the search enumerates: kinds of identical devices, stage groups ("units") and replica templates.

A *kind* is a set of interchangeable devices (same chip, memory, rate and node interconnect); the
search works on kinds, never on single devices, so its cost does not grow with the pool's size.
A *unit* is g devices of one kind inside one node, tensor-parallel of degree t (t divides g; the
g / t data ranks split each micro-batch and may shard the stage). A *template* is an ordered list of
(kind, g, t, count) blocks: one replica's stages; the pool holds R copies of it.
Per stage the memory options (checkpoint x shard x offload) are tabled once: time is linear in the
blocks a stage holds, memory linear in blocks and in micro-batches in flight, so a stage's cost for
every block count is one numpy expression (chipfuse.plan.partition solves the split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from chipfuse.model.costs import DTYPE_BYTES, ModelCosts
from chipfuse.plan.cost import block_time, group_sync_s, optimizer_s
from chipfuse.plan.hardware import GroupHW, PoolIndex, p2p_s
from chipfuse.plan.memory import StageShape, stage_memory, usable
from chipfuse.plan.partition import partition

CHECKPOINTS = ("none", "selective", "full")
SHARDS = ("none", "optimizer", "grads", "full")
OFFLOADS = ("none", "optimizer", "params")


@dataclass(frozen=True, kw_only=True)
class Kind:
    name: str
    rate: float
    """Sustained FLOP/s of one device."""
    memory_bytes: int
    per_node: tuple[tuple[str, tuple[str, ...]], ...]
    """(node, device names) in pool order."""

    @property
    def count(self) -> int:
        return sum(len(n) for _, n in self.per_node)

    def units(self, g: int) -> list[tuple[str, ...]]:
        return [names[i:i + g] for _, names in self.per_node for i in range(0, len(names) - g + 1, g)]


RATE_TOLERANCE = 0.05
"""Devices of one chip whose rates differ by less than this are one kind: a profile measures equal
chips a few tenths of a percent apart, and splitting them would keep them out of one group."""


def device_kinds(ix: PoolIndex) -> list[Kind]:
    similar: dict[tuple, list[tuple[float, str, str]]] = {}
    order = {d.name: i for i, d in enumerate(ix.pool.devices)}
    outside = worst_outside_link(ix)
    for node in ix.pool.nodes:
        for d in node.devices:
            key = (d.chip.name, d.memory_bytes, node.intra_bandwidth, node.intra_latency_s, outside[node.name])
            similar.setdefault(key, []).append((ix.rate(d.name), node.name, d.name))
    kinds = []
    for key, devs in similar.items():
        clusters: list[list[tuple[float, str, str]]] = []
        for dev in sorted(devs):  # slowest first: a kind spans rates within RATE_TOLERANCE of its slowest
            if clusters and dev[0] <= clusters[-1][0][0] * (1 + RATE_TOLERANCE):
                clusters[-1].append(dev)
            else:
                clusters.append([dev])
        for cl in clusters:
            per_node: dict[str, list[str]] = {}
            for _, node_name, name in sorted(cl, key=lambda x: order[x[2]]):
                per_node.setdefault(node_name, []).append(name)
            # The kind runs at its slowest member's rate: a group waits for it.
            kinds.append(Kind(name=key[0], rate=cl[0][0], memory_bytes=key[1],
                              per_node=tuple((n, tuple(v)) for n, v in per_node.items())))
    # Same chip on different interconnects or speeds: tell them apart in names.
    seen: dict[str, int] = {}
    out = []
    for k in sorted(kinds, key=lambda k: -k.rate):
        n = seen.get(k.name, 0)
        seen[k.name] = n + 1
        out.append(k if n == 0 else replace(k, name=f"{k.name}#{n + 1}"))
    return out


def worst_outside_link(ix: PoolIndex) -> dict[str, float]:
    """Per node, the slowest link to another node: a node behind a slow link is its own kind, so the
    search can leave it out."""
    pool = ix.pool
    partners: dict[str, set[str]] = {n.name: set() for n in pool.nodes}
    worst = {n.name: float("inf") for n in pool.nodes}
    for ln in pool.links:
        if ln.a != ln.b and ln.a in worst and ln.b in worst:
            bw = ix.link(ln.a, ln.b)[0]
            for x, y in ((ln.a, ln.b), (ln.b, ln.a)):
                partners[x].add(y)
                worst[x] = min(worst[x], bw)
    for n in worst:
        if len(partners[n]) < len(worst) - 1:
            worst[n] = min(worst[n], pool.default_link.bandwidth)
    return worst


def unit_configs(kind: Kind, costs: ModelCosts, max_tp: int = 8, max_group: int | None = None) -> list[tuple[int, int]]:
    """(g, t): group sizes up to the kind's largest node (and `max_group`), tp degrees dividing heads and KV heads."""
    biggest = max(len(n) for _, n in kind.per_node)
    if max_group is not None:
        biggest = min(biggest, max_group)
    out = []
    g = 1
    while g <= biggest:
        t = 1
        while t <= min(g, max_tp):
            if costs.spec.num_heads % t == 0 and costs.spec.kv_heads % t == 0:
                out.append((g, t))
            t *= 2
        g *= 2
    return out


@dataclass(frozen=True, kw_only=True)
class OptionTable:
    """One stage position's memory options: time and memory as linear functions."""

    options: tuple[tuple[str, str, str], ...]
    """(checkpoint, shard, offload)."""
    tau: np.ndarray
    """Seconds per block (forward + backward, one micro-batch)."""
    extra: np.ndarray
    fixed_bytes: np.ndarray
    state_bytes_per_block: np.ndarray
    act_bytes_per_block: np.ndarray
    """Per micro-batch in flight."""
    step_s_per_block: np.ndarray
    """Once-per-step seconds per block: optimizer (on the host when offloaded) and the group's own sync."""
    capacity: int

    def cost(self, L: int, in_flight: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(seconds for k = 0..L blocks, inf where nothing fits; index of the option chosen).

        Once-per-step costs are spread over the m micro-batches, so that the pipeline objective
        (m micro-batches of the slowest stage) counts them about once.
        """
        ks = np.arange(L + 1)[:, None]
        per = self.state_bytes_per_block + in_flight * self.act_bytes_per_block
        fits = self.fixed_bytes + ks * per <= self.capacity
        t = np.where(fits, ks * (self.tau + self.step_s_per_block / max(1, m)) + self.extra, np.inf)
        choice = np.argmin(t, axis=1)
        best = t[np.arange(L + 1), choice]
        best[0] = np.inf
        return best, choice


def option_tables(costs: ModelCosts, hw: GroupHW, *, g: int, t: int, mbs: int, dtype: str,
                  optimizer_dtype: str, offloads: tuple[str, ...] = OFFLOADS,
                  accumulates: bool = True) -> dict[tuple[bool, bool], OptionTable]:
    """The option tables of the four stage positions (first?, last?) of one unit config.
    accumulates: a step runs several micro-batches, so earlier micro-batches' gradients are held
    while later ones' activations live (plan.memory); False for a single micro-batch per step.

    What grows per block is the same in every position; only the fixed part (embedding, head,
    logits) differs, so the per-block figures are computed once.
    """
    d = g // t
    # Parameter offload is FSDP2's; the runtime does not combine it with tensor parallel in one group.
    # A data-parallel group always runs sharded (plan.dims): its choice is the ZeRO level, never "none".
    opts = [(c, s, o) for c in CHECKPOINTS for s in (SHARDS[1:] if d > 1 else ("none",)) for o in offloads
            if not (t > 1 and o == "params")]
    positions = [(False, False), (True, False), (False, True), (True, True)]
    per_block: list[tuple[float, ...]] = []
    fixed: dict[tuple[bool, bool], list[tuple[float, float]]] = {pos: [] for pos in positions}
    for c, s, o in opts:
        def shape(n: int, f: int, first: bool = False, last: bool = False, c: str = c, s: str = s,
                  o: str = o) -> StageShape:
            # Two micro-batches stand for every count above one: memory only asks whether any accumulate.
            return StageShape(num_layers=n, is_first=first, is_last=last, group_size=g, tp=t, checkpoint=c,
                              shard=s, offload=o, micro_batch_size=mbs, in_flight=f,
                              micro_batches=2 if accumulates else 1)

        def mem(sh: StageShape) -> float:
            return stage_memory(costs, sh, dtype=dtype, optimizer_dtype=optimizer_dtype).total

        def once(sh: StageShape) -> float:
            return (optimizer_s(costs, hw, sh, dtype=dtype, optimizer_dtype=optimizer_dtype)
                    + group_sync_s(costs, hw, sh, dtype=dtype))

        mid = shape(1, 1)
        bt = block_time(costs, hw, mid, dtype=dtype)
        act = mem(shape(1, 2)) - mem(mid)
        # The per-block slope from 2 to 3 blocks: under ZeRO-3 the gathered weights stop growing at two
        # blocks (plan.memory), so the slope from 0 to 1 would charge a whole block per block. The
        # fixed part absorbs the rest (for a one-block stage: one gathered block too many, on the safe side).
        lo, hi = (2, 3) if costs.num_layers >= 3 else (0, 1)
        state = mem(shape(hi, 1)) - mem(shape(lo, 1)) - act
        per_block.append((bt.fwd_per_block_s + bt.bwd_per_block_s, state, act, once(mid) - once(shape(0, 1))))
        for first, last in positions:
            extra = block_time(costs, hw, shape(1, 1, first, last), dtype=dtype) if last else bt
            fixed[(first, last)].append((extra.fwd_extra_s + extra.bwd_extra_s,
                                         mem(shape(lo, 1, first, last)) - lo * (state + act)))
    a = np.array(per_block, dtype=float)
    out = {}
    for pos in positions:
        f = np.array(fixed[pos], dtype=float)
        out[pos] = OptionTable(options=tuple(opts), tau=a[:, 0], extra=f[:, 0], fixed_bytes=f[:, 1],
                               state_bytes_per_block=a[:, 1], act_bytes_per_block=a[:, 2], step_s_per_block=a[:, 3],
                               capacity=usable(hw.memory_bytes, emulated=hw.emulated))
    return out


@dataclass(frozen=True, kw_only=True)
class Block:
    kind: int
    g: int
    t: int
    count: int


@dataclass(kw_only=True)
class Template:
    """One replica's stage layout, solved: blocks per stage and memory option per stage."""

    blocks: tuple[Block, ...]
    mbs: int
    replicas: int
    layers: list[int] = field(default_factory=list)
    options: list[tuple[str, str, str]] = field(default_factory=list)
    stage_s: list[float] = field(default_factory=list)
    p2p: list[float] = field(default_factory=list)
    objective_s: float = math.inf
    m_est: int = 1

    @property
    def stages(self) -> list[tuple[int, int, int]]:
        return [(b.kind, b.g, b.t) for b in self.blocks for _ in range(b.count)]

    @property
    def steady_s(self) -> float:
        return max(max(self.stage_s), max(self.p2p, default=0.0))

    @property
    def fill_s(self) -> float:
        return sum(self.stage_s) + 2 * sum(self.p2p) - self.steady_s

    def devices_used(self, kinds: list[Kind]) -> int:
        return self.replicas * sum(b.g * b.count for b in self.blocks)


class TemplateSolver:
    """Solves templates for one (pool, model, settings), caching option tables across them."""

    def __init__(self, ix: PoolIndex, costs: ModelCosts, kinds: list[Kind], *, dtype: str, optimizer_dtype: str,
                 schedule: str, offloads: tuple[str, ...] = OFFLOADS):
        self.ix, self.costs, self.kinds = ix, costs, kinds
        self.dtype, self.optimizer_dtype, self.schedule = dtype, optimizer_dtype, schedule
        self.offloads = offloads
        self._tables: dict[tuple, dict[tuple[bool, bool], OptionTable]] = {}
        self._units: dict[tuple[int, int], list[tuple[str, ...]]] = {}
        self._costs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def units(self, kind: int, g: int) -> list[tuple[str, ...]]:
        key = (kind, g)
        if key not in self._units:
            self._units[key] = self.kinds[kind].units(g)
        return self._units[key]

    def table(self, kind: int, g: int, t: int, mbs: int, first: bool, last: bool,
              accumulates: bool = True) -> OptionTable:
        key = (kind, g, t, mbs, accumulates)
        tabs = self._tables.get(key)
        if tabs is None:
            hw = self.ix.hw(self.units(kind, g)[0])
            tabs = self._tables[key] = option_tables(self.costs, hw, g=g, t=t, mbs=mbs, dtype=self.dtype,
                                                     optimizer_dtype=self.optimizer_dtype, offloads=self.offloads,
                                                     accumulates=accumulates)
        return tabs[(first, last)]

    def placement(self, tpl: Template, r: int) -> list[tuple[str, ...]]:
        """The units replica r of a template runs on (each kind's units dealt out in node order)."""
        out = []
        for b in tpl.blocks:
            us = self.units(b.kind, b.g)
            start = r * sum(bb.count for bb in tpl.blocks if (bb.kind, bb.g) == (b.kind, b.g))
            prior = 0
            for bb in tpl.blocks:
                if bb is b:
                    break
                if (bb.kind, bb.g) == (b.kind, b.g):
                    prior += bb.count
            out.extend(us[start + prior:start + prior + b.count])
        return out

    def solve(self, tpl: Template, *, exact: bool = False) -> Template:
        stages = tpl.stages
        p, L = len(stages), self.costs.num_layers
        if p > L or tpl.replicas < 1:
            return tpl
        m = max(1, tpl.m_est)
        costs_, choices = [], []
        for i, (k, g, t) in enumerate(stages):
            # m is the estimate the shares will meet; predict()'s final memory check is exact.
            tab = self.table(k, g, t, tpl.mbs, i == 0, i == p - 1, accumulates=m > 1)
            fl = m if self.schedule == "gpipe" else max(1, min(m, p - i))
            key = (k, g, t, tpl.mbs, i == 0, i == p - 1, fl, m)
            if key not in self._costs:
                self._costs[key] = tab.cost(L, fl, m)
            c, ch = self._costs[key]
            costs_.append(c)
            choices.append((tab, ch))
        units = self.placement(tpl, 0)
        nbytes = tpl.mbs * self.costs.seq_len * self.costs.spec.dim * DTYPE_BYTES[self.dtype]
        p2p = []
        for a, b in zip(units[:-1], units[1:], strict=True):
            bw, lat = self.ix.link(self.ix.dev[a[0]].node, self.ix.dev[b[0]].node)
            p2p.append(p2p_s(nbytes, bw, lat))
        got = partition(costs_, L, m, p2p, exact=exact)
        if got is None:
            return tpl
        ks, obj = got
        tpl.layers = ks
        tpl.options = [tab.options[int(ch[k])] for (tab, ch), k in zip(choices, ks, strict=True)]
        tpl.stage_s = [float(c[k]) for c, k in zip(costs_, ks, strict=True)]
        tpl.p2p = p2p
        tpl.objective_s = obj
        return tpl
