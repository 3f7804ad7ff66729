"""`chipfuse plan --max-model`: the largest model of a family a pool can train, per memory strategy.

Pure: a pool and a base ModelSpec in, a table out. The family keeps the base's depth, vocabulary
and sequence length and scales its width (dim in steps of `head_dim`, heads = dim / head_dim),
the way GPT-2 small to XL and Llama 7B to 70B grow mostly in width. Memory is the planner's own
model (plan.memory.stage_memory, the one every searched plan is checked against), monotone in width,
so each strategy's largest width is found by bisection; benchmarks/memory.py then measures it.

Strategies are cumulative in the usual order of cost: plain data parallel (every device holds the
whole model), + activation checkpointing, + sharding (ZeRO-3 over the group of devices that can
shard, see best_shard_group), + 8-bit optimizer state, + parameter offload; "combined" is all of
them. Offload is "refused" on pools with CPU devices (host memory is their memory).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from chipfuse.model.costs import model_costs
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.memory import StageShape, Strategy, best_shard_group, stage_memory, usable_bytes
from chipfuse.report.output import human_bytes

LADDER: tuple[tuple[str, Strategy], ...] = (
    ("plain", Strategy()),
    ("checkpoint", Strategy(checkpoint="full")),
    ("shard", Strategy(shard="full")),
    ("8-bit optimizer", Strategy(optimizer_dtype="int8")),
    ("offload", Strategy(offload="params")),
    ("shard+checkpoint+8-bit", Strategy(checkpoint="full", shard="full", optimizer_dtype="int8")),
    ("combined", Strategy(checkpoint="full", shard="full", offload="params", optimizer_dtype="int8")),
)


@dataclass(frozen=True, kw_only=True)
class MaxModel:
    strategy: str
    label: str
    dim: int
    """0 when not even the smallest width fits."""
    num_params: int
    devices: tuple[str, ...]
    """Devices that hold it (one replica or one sharded group)."""
    limit: str
    """What stops the next width: device and its largest memory term, or why the strategy is refused."""
    peak_bytes: float


def family_member(base: ModelSpec, dim: int, head_dim: int) -> ModelSpec:
    return replace(base, name=f"{base.name}-d{dim}", dim=dim, num_heads=max(1, dim // head_dim),
                   num_kv_heads=None if base.num_kv_heads is None else max(1, dim // head_dim), ffn_dim=None)


def num_params(spec: ModelSpec) -> int:
    block, embed, head = family_of(spec).tensor_numels(spec)
    return spec.num_layers * sum(block) + sum(embed) + sum(head)


@dataclass(frozen=True, kw_only=True)
class _Memory:
    """One device's predicted bytes by kind (plan.memory.StageMemory), against its usable memory."""

    device: str
    capacity_bytes: int
    parts: dict[str, float]

    @property
    def peak_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def missing_bytes(self) -> float:
        return max(0.0, self.peak_bytes - self.capacity_bytes)

    @property
    def limit(self) -> str:
        return max(self.parts, key=self.parts.__getitem__)


def _memory(spec: ModelSpec, st: Strategy, device: str, capacity: int, group: int, micro_batch_size: int) -> _Memory:
    sh = StageShape(num_layers=spec.num_layers, is_first=True, is_last=True, group_size=group,
                    checkpoint=st.checkpoint, shard=st.shard if group > 1 else "none", offload=st.offload,
                    micro_batch_size=micro_batch_size * group, in_flight=1)
    m = stage_memory(model_costs(spec), sh, dtype=st.dtype, optimizer_dtype=st.optimizer_dtype)
    parts = {"parameters": m.weights, "gradients": m.grads, "optimizer state": m.optimizer,
             "activations": m.activations, "gathered parameters and buffers": m.transient}
    return _Memory(device=device, capacity_bytes=capacity, parts=parts)


def _fit(spec: ModelSpec, st: Strategy, caps: dict[str, int], micro_batch_size: int):
    """(fits, devices, memory of the tightest member) for one model under one strategy."""
    ranked = sorted(caps, key=lambda d: (-caps[d], d))

    def mem(dev: str, group: int) -> _Memory:
        return _memory(spec, st, dev, caps[dev], group, micro_batch_size)

    if st.shard == "none":
        # Each device alone: the model fits where the largest device can hold it.
        m = mem(ranked[0], 1)
        return m.missing_bytes == 0, (ranked[0],), m
    group = best_shard_group(caps, lambda k: mem(ranked[0], k).peak_bytes)
    if group:
        return True, group, mem(group[-1], len(group))
    # None fits: report the group that comes closest, at its smallest member.
    tightest = [mem(ranked[k - 1], k) for k in range(1, len(ranked) + 1)]
    k_best = min(range(len(ranked)), key=lambda k: tightest[k].missing_bytes)
    return False, tuple(ranked[:k_best + 1]), tightest[k_best]


def max_model(pool, base: ModelSpec, *, micro_batch_size: int = 1, head_dim: int = 64, dtype: str = "bf16",
              max_dim: int = 1 << 16, ladder=LADDER) -> list[MaxModel]:
    """For each strategy of `ladder`, the widest member of `base`'s family that fits `pool` (predicted),
    computing in `dtype` (fp32 master weights with bf16)."""
    caps = {d.name: usable_bytes(d) for d in pool.devices}
    has_cpu = any(d.kind.host_memory for d in pool.devices)
    out = []
    for name, st in ladder:
        st = replace(st, dtype=dtype)
        if st.offload != "none" and has_cpu:
            out.append(MaxModel(strategy=name, label=st.label, dim=0, num_params=0, devices=(), peak_bytes=0.0,
                                limit="refused: the pool has CPU devices, whose memory is host memory"))
            continue
        lo, hi = 0, max_dim // head_dim  # widths in units of head_dim; lo fits (0 = nothing), hi+1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fit(family_member(base, mid * head_dim, head_dim), st, caps, micro_batch_size)[0]:
                lo = mid
            else:
                hi = mid - 1
        nxt = family_member(base, (lo + 1) * head_dim, head_dim)
        _, near, worst = _fit(nxt, st, caps, micro_batch_size)
        group = f" in a group of {len(near)}" if st.shard != "none" else ""
        limit = (f"{worst.device}{group}: {worst.limit} ({human_bytes(worst.peak_bytes)} of "
                 f"{human_bytes(worst.capacity_bytes)} at dim {(lo + 1) * head_dim})")
        if lo == 0:
            out.append(MaxModel(strategy=name, label=st.label, dim=0, num_params=0, devices=(), limit=limit,
                                peak_bytes=0.0))
            continue
        spec = family_member(base, lo * head_dim, head_dim)
        _, devices, fit_worst = _fit(spec, st, caps, micro_batch_size)
        out.append(MaxModel(strategy=name, label=st.label, dim=lo * head_dim, num_params=num_params(spec),
                            devices=devices, limit=limit, peak_bytes=fit_worst.peak_bytes))
    return out


def report(pool, base: ModelSpec, *, micro_batch_size: int, dtype: str, head_dim: int = 64) -> dict:
    """`chipfuse plan --max-model`: print the table, return the JSON-able result."""
    from rich.console import Console

    from chipfuse.report.output import console, table

    wide = Console(highlight=False, width=max(console.width, 130))  # five columns, the last one long

    notes = []
    if dtype == "bf16" and not all(d.chip.has_bf16 for d in pool.devices):
        notes.append("some chips have no bf16: sized in fp32")
        dtype = "fp32"
    fam = family_of(base)
    if not fam.numels_exact:
        notes.append(f"{fam.label} shapes are sized with the GPT tensor list of plan.memory's model")
    rows = max_model(pool, base, micro_batch_size=micro_batch_size, head_dim=head_dim, dtype=dtype)
    wide.print(table(f"largest {base.name}-family model per memory strategy on {pool.name} (predicted; "
                        f"{base.num_layers} layers, seq {base.seq_len}, {micro_batch_size} sample(s) per device, {dtype})",
                        ["strategy", "dim", "params", "devices", "what limits it"],
                        [[m.strategy, m.dim, _count(m.num_params), len(m.devices), m.limit] for m in rows]))
    for n in notes:
        console.print(f"note: {n}")
    if pool.emulated:
        console.print("the pool is EMULATED: sizes are for its emulated memory caps")
    return {"emulated": pool.emulated, "pool": pool.name, "family": base.to_dict(), "dtype": dtype,
            "micro_batch_size": micro_batch_size, "notes": notes,
            "max_model": [{"strategy": m.strategy, "label": m.label, "dim": m.dim, "num_params": m.num_params,
                           "devices": list(m.devices), "limit": m.limit, "peak_bytes": m.peak_bytes} for m in rows]}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
