"""The inference plan: which devices hold which layers, at what weight precision, and how fast it serves.

Pure (no torch). Inputs: a pool, a ModelSpec, the context length and the number of requests in
flight. Output: a ServePlan (frozen, JSON-serialisable, writable by hand) and its ServePrediction.

Cost model (per device holding n decoder layers; costs from chipfuse.model.costs at the context length c):
  weights    n x block parameters x bytes of its weight precision (bf16 2, int8 1, int4 0.5 + group scales),
             plus the embedding on the first stage and the final norm + head on the last, in the compute dtype
             (weight-only quantisation touches the decoder layers' linear layers only).
  KV cache   n x concurrency x c x kv_cache_bytes_per_token (keys and values in the compute dtype).
  workspace  one prefill's activations (prompt x (4 h + 2 f) elements) and the last stage's fp32 logits.
  The sum must stay within chipfuse.plan.memory.usable(device memory).
  decode step of b sequences: max(bytes read / memory bandwidth, FLOPs / sustained FLOP/s) + n launches,
             bytes read = weights + b x c x n x KV per token (decode is bandwidth-bound: weights are read
             once per step whatever b is). An emulated device's bandwidth is scaled by its speed, as its
             FLOP/s are (cluster.pool.Device.peak_flops).
  prefill of p tokens: p x FLOPs per token / (sustained FLOP/s x p / (p + 128)) + n launches (compute-bound).
  hop: hidden states (b x h in the compute dtype) over the link to the next stage (plan.hardware.p2p_s).
Pipeline with B requests in flight over s stages: g groups (1 <= g <= min(B, s), chosen by the search)
  of ceil(B / g) sequences circulate, so a token of every request takes max(sum_i (t_i + hop_i), g x max_i t_i)
  and tokens/s = B / that. Time to first token = sum_i (prefill_i + hop_i) on an idle pipeline.

Search: every subset of the pool (pools of up to EXHAUSTIVE devices; larger ones: the k fastest for each
k), in pool order; each subset's layers by two rules, balanced (each layer to the device that keeps the
slowest stage fastest) and fastest-first (fill the fastest device, then the next); a subset short of memory
lowers the weight precision of its most memory-bound device, bf16 -> int8 -> int4, one step at a time.
The best prediction wins; since every subset of a smaller pool is also a subset of a larger one, adding a
device never makes the chosen plan slower. Devices left out are listed with the reason.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from chipfuse.cluster.pool import Device, Pool
from chipfuse.errors import PlanError
from chipfuse.model.costs import DTYPE_BYTES, ModelCosts, model_costs
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.hardware import BLOCK_LAUNCH_S, TOKENS_HALF, PoolIndex, p2p_s, sustained_flops
from chipfuse.plan.memory import usable_bytes
from chipfuse.plan.plan import JsonForm, checked_plan, read_plan_json
from chipfuse.plan.shares import proportional_shares

WeightDtype = Literal["fp32", "bf16", "int8", "int4"]
WEIGHT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
COMPUTE_DTYPES = ("fp32", "bf16")
QUANT_BYTES = {"int8": 1.0 + 2 / 128, "int4": 0.5 + 4 / 128}
"""Bytes per weight with torchao weight-only quantisation: int8 with one bf16 scale per output row
(rows of >= 128 inputs), int4 in groups of 128 with a bf16 scale and zero point per group."""
MEM_BW_EFFICIENCY = 0.8
"""Sustained / peak memory bandwidth of a decode step (streaming reads of large weight matrices)."""
EXHAUSTIVE = 10
"""Pools up to this size try every subset of devices (2^10 subsets, a fraction of a second)."""


def weight_bytes(weight_dtype: str) -> float:
    return QUANT_BYTES.get(weight_dtype) or float(DTYPE_BYTES[weight_dtype])


# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class ServeStage:
    device: str
    first_layer: int
    num_layers: int
    weight_dtype: WeightDtype = "bf16"
    """Precision of this stage's decoder-layer weights: the compute dtype, or int8/int4 weight-only."""

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True, kw_only=True)
class Excluded:
    device: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ServePlan(JsonForm):
    """A pipeline of stages, one device each, in order; stage 0 also holds the embedding, the last the head."""

    model: ModelSpec
    stages: tuple[ServeStage, ...]
    context_len: int
    """Longest prompt + generated tokens of one request; the KV cache is sized for it."""
    concurrency: int
    """Requests in flight at once; each holds a KV cache of context_len tokens on every stage."""
    prompt_tokens: int
    """Prompt length the time to first token is predicted for."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Compute dtype (and the precision of weights not quantised)."""
    groups: int = 0
    """Groups of sequences in flight around the pipeline (each stage steps every group once per token);
    0 = one per stage, at most `concurrency`. Fewer groups read the weights fewer times per token."""
    excluded: tuple[Excluded, ...] = ()
    strategy: str = "manual"
    """chipfuse | even | memory-proportional | manual."""
    pool: str = ""
    version: int = 1

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<serve plan>") -> ServePlan:
        """A serve plan from its JSON form, checked by the same rules as a training plan."""
        return checked_plan(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> ServePlan:
        raw = read_plan_json(path, body_key="stages", writer="chipfuse plan --serve --json")
        return cls.from_dict(raw, source=str(path))

    def check(self, source: str = "<serve plan>", pool: Pool | None = None) -> None:
        def fail(where: str, problem: str, fix: str) -> PlanError:
            return PlanError(f"{source}: {where}: {problem}. Fix: {fix}")

        if self.dtype not in COMPUTE_DTYPES:
            raise fail("dtype", f"is {self.dtype!r}", f"use one of {COMPUTE_DTYPES}")
        if not 0 < self.context_len <= self.model.seq_len:
            raise fail("context_len", f"is {self.context_len}, the model allows 1..{self.model.seq_len}",
                       "lower context_len")
        if self.concurrency < 1:
            raise fail("concurrency", f"is {self.concurrency}", "use at least 1")
        if not 0 < self.prompt_tokens <= self.context_len:
            raise fail("prompt_tokens", f"is {self.prompt_tokens}, context_len is {self.context_len}",
                       "use 1..context_len")
        if not self.stages:
            raise fail("stages", "is empty", "give at least one stage")
        if not 0 <= self.groups <= min(self.concurrency, len(self.stages)):
            raise fail("groups", f"is {self.groups}", f"use 0..{min(self.concurrency, len(self.stages))}")
        nxt, seen = 0, set()
        for i, s in enumerate(self.stages):
            w = f"stages[{i}]"
            if s.first_layer != nxt or s.num_layers <= 0:
                raise fail(f"{w}.first_layer", f"covers layers {s.first_layer}..+{s.num_layers}, expected to start "
                           f"at {nxt}", "make stages contiguous, each with >= 1 layer")
            nxt += s.num_layers
            if s.weight_dtype not in WEIGHT_DTYPES or (s.weight_dtype in COMPUTE_DTYPES and s.weight_dtype != self.dtype):
                raise fail(f"{w}.weight_dtype", f"is {s.weight_dtype!r} with dtype {self.dtype!r}",
                           f"use {self.dtype!r}, 'int8' or 'int4'")
            if s.device in seen:
                raise fail(f"{w}.device", f"device {s.device!r} is used twice", "use each device once")
            seen.add(s.device)
            if pool is not None and s.device not in {d.name for d in pool.devices}:
                raise fail(f"{w}.device", f"{s.device!r} is not in pool {pool.name!r}",
                           "re-plan for this pool with `chipfuse plan --serve`")
        if nxt != self.model.num_layers:
            raise fail("stages", f"cover {nxt} layers, the model has {self.model.num_layers}", "cover every layer once")



# ---------------------------------------------------------------------------------------- the cost model


@dataclass(frozen=True, kw_only=True)
class StagePrediction:
    device: str
    num_layers: int
    weight_dtype: str
    decode_step_s: float
    """One decode step of one group of sequences on this stage."""
    prefill_s: float
    """The prompt's prefill on this stage."""
    hop_s: float
    """Sending one group's hidden states to the next stage (the last stage: its tokens back to the first)."""
    memory_bytes: int
    capacity_bytes: int
    """Usable memory (plan.memory.usable)."""

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.capacity_bytes


@dataclass(frozen=True, kw_only=True)
class ServePrediction:
    ttft_s: float
    """Time to first token of one request on an idle pipeline."""
    decode_tokens_per_s: float
    """Tokens per second over all requests with `concurrency` in flight."""
    token_interval_s: float
    """Seconds between two tokens of one request."""
    stages: tuple[StagePrediction, ...]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        return d


class _Model:
    """Costs of one model at one context on one pool, with per-device rates cached."""

    def __init__(self, pool: Pool, spec: ModelSpec, *, context_len: int, concurrency: int, prompt_tokens: int,
                 dtype: str):
        self.pool, self.spec, self.dtype = pool, spec, dtype
        self.c, self.B, self.T = context_len, concurrency, prompt_tokens
        self.costs: ModelCosts = model_costs(spec, seq_len=context_len)
        self.prefill_costs: ModelCosts = model_costs(spec, seq_len=prompt_tokens)
        self.ix = PoolIndex(pool, None, dtype)
        self.w = DTYPE_BYTES[dtype]
        self.kv = self.costs.kv_cache_bytes_per_token(dtype)

    def mem_bw(self, dev: Device) -> float:
        bw = dev.chip.mem_bw * MEM_BW_EFFICIENCY
        return bw * dev.emulation.speed if dev.emulation else bw

    def flops(self, dev: Device) -> float:
        return sustained_flops(dev, self.dtype)

    def static_bytes(self, n: int, wd: str, first: bool, last: bool) -> float:
        c = self.costs
        b = n * (c.block_matmul_params * weight_bytes(wd) + (c.block_params - c.block_matmul_params) * self.w)
        if first:
            b += c.embed_params * self.w
        if last:
            b += c.head_params * self.w
            if self.spec.tie_embeddings and not first:
                b += self.spec.vocab_size * self.spec.dim * self.w  # the last stage's own copy of the tied matrix
        return b

    def memory(self, n: int, wd: str, first: bool, last: bool) -> int:
        s = self.spec
        kv = n * self.B * self.c * self.kv
        work = self.T * (4 * s.dim + 2 * s.ffn) * self.w + (self.B * s.vocab_size * 4 if last else 0)
        return int(self.static_bytes(n, wd, first, last) + kv + work)

    def layers_fitting(self, dev: Device, wd: str, first: bool, last: bool) -> int:
        room = usable_bytes(dev) - self.memory(0, wd, first, last)
        per = self.memory(1, wd, first, last) - self.memory(0, wd, first, last)
        return max(0, int(room // per)) if room > 0 else 0

    def decode_s(self, dev: Device, n: int, wd: str, first: bool, last: bool, b: int) -> float:
        c = self.costs
        read = self.static_bytes(n, wd, first, last) - (c.embed_params * self.w if first else 0)  # a gather
        read += b * self.c * n * self.kv
        fl = b * (n * c.block_fwd_flops_per_token + (c.head_fwd_flops_per_token if last else 0))
        return max(read / self.mem_bw(dev), fl / self.flops(dev)) + n * BLOCK_LAUNCH_S

    def prefill_s(self, dev: Device, n: int, last: bool) -> float:
        c, p = self.prefill_costs, self.T
        fl = p * n * c.block_fwd_flops_per_token + (c.head_fwd_flops_per_token if last else 0)  # head: last token
        return fl / (self.flops(dev) * p / (p + TOKENS_HALF)) + n * BLOCK_LAUNCH_S

    def hop_s(self, a: Device, b: Device, tokens: int) -> float:
        bw, lat = self.ix.link(a.node, b.node)
        return p2p_s(tokens * self.spec.dim * self.w, bw, lat)

    def predict(self, stages: tuple[ServeStage, ...], groups: int = 0) -> ServePrediction:
        devs = [self.ix.dev[s.device] for s in stages]
        k = len(stages)
        groups = groups or min(self.B, k)
        b = math.ceil(self.B / groups)
        out = []
        for i, (s, d) in enumerate(zip(stages, devs, strict=True)):
            first, last = i == 0, i == k - 1
            nxt = devs[(i + 1) % k]
            # The last stage sends sampled token ids back to the first: a few bytes, latency only.
            hop = self.hop_s(d, nxt, b) if not last else (self.ix.link(d.node, nxt.node)[1] if k > 1 else 0.0)
            out.append(StagePrediction(
                device=s.device, num_layers=s.num_layers, weight_dtype=s.weight_dtype,
                decode_step_s=self.decode_s(d, s.num_layers, s.weight_dtype, first, last, b),
                prefill_s=self.prefill_s(d, s.num_layers, last),
                hop_s=hop if last else self.hop_s(d, nxt, b),
                memory_bytes=self.memory(s.num_layers, s.weight_dtype, first, last),
                capacity_bytes=usable_bytes(d)))
        loop = sum(s.decode_step_s + s.hop_s for s in out)
        interval = max(loop, groups * max(s.decode_step_s for s in out))
        ttft = sum(s.prefill_s for s in out) + sum(self.hop_s(devs[i], devs[i + 1], self.T) for i in range(k - 1))
        return ServePrediction(ttft_s=ttft, decode_tokens_per_s=self.B / interval, token_interval_s=interval,
                               stages=tuple(out))


# ---------------------------------------------------------------------------------------- search


@dataclass(frozen=True, kw_only=True)
class ServeScored:
    plan: ServePlan
    prediction: ServePrediction

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "predicted": self.prediction.to_dict()}


@dataclass(frozen=True, kw_only=True)
class ServeSearch:
    best: ServeScored
    baselines: dict[str, ServeScored | None] = field(default_factory=dict)
    """even | memory-proportional (None when the pool cannot hold the model that way at all)."""
    candidates: int = 0

    def to_dict(self) -> dict[str, Any]:
        base = {k: (v.to_dict() if v else None) for k, v in self.baselines.items()}
        ours = self.best.prediction.decode_tokens_per_s
        speedup = {k: (ours / v.prediction.decode_tokens_per_s if v and v.prediction.fits else None)
                   for k, v in self.baselines.items()}
        return {**self.best.to_dict(), "baselines": base, "speedup": speedup, "candidates": self.candidates}


def _stages(devs: list[Device], layers: list[int], wds: list[str]) -> tuple[ServeStage, ...]:
    out, first = [], 0
    for d, n, wd in zip(devs, layers, wds, strict=True):
        out.append(ServeStage(device=d.name, first_layer=first, num_layers=n, weight_dtype=wd))  # type: ignore[arg-type]
        first += n
    return tuple(out)


def _allocate(m: _Model, devs: list[Device], start: str) -> list[tuple[list[int], list[str]]]:
    """Layer counts (each >= 1) and weight precisions (`start` or lower) for `devs` in this order:
    balanced and fastest-first."""
    L, k = m.spec.num_layers, len(devs)
    if k > L:
        return []
    flags = [(i == 0, i == k - 1) for i in range(k)]
    wds = [start] * k
    order = (m.dtype, "int8", "int4")
    b = math.ceil(m.B / min(m.B, k))
    while True:
        caps = [m.layers_fitting(d, wd, f, la) for d, wd, (f, la) in zip(devs, wds, flags, strict=True)]
        if sum(caps) >= L and min(caps) >= 1:
            break
        # Lower the precision of the device that is shortest of memory for its speed, one step.
        can = [i for i in range(k) if wds[i] != "int4"]
        if not can:
            return []
        per_layer = [m.decode_s(d, 1, m.dtype, False, False, b) for d in devs]
        i = min(can, key=lambda j: caps[j] * per_layer[j])
        wds[i] = order[order.index(wds[i]) + 1]
    t1 = [m.decode_s(d, 1, wd, False, False, b) - BLOCK_LAUNCH_S for d, wd in zip(devs, wds, strict=True)]
    fixed = [m.decode_s(d, 0, wd, f, la, b) for d, wd, (f, la) in zip(devs, wds, flags, strict=True)]
    # Balanced: every device starts with one layer; each further layer goes where the stage stays fastest.
    bal = [1] * k
    for _ in range(L - k):
        i = min((j for j in range(k) if bal[j] < caps[j]),
                key=lambda j: fixed[j] + (bal[j] + 1) * (t1[j] + BLOCK_LAUNCH_S))
        bal[i] += 1
    # Fastest-first: one layer each, then fill the fastest device to its capacity, then the next.
    ff, left = [1] * k, L - k
    for i in sorted(range(k), key=lambda j: t1[j]):
        add = min(left, caps[i] - 1)
        ff[i] += add
        left -= add
    return [(bal, wds), (ff, list(wds))]


def _candidate_sets(m: _Model, devices: list[Device]) -> list[list[Device]]:
    if len(devices) <= EXHAUSTIVE:
        return [list(c) for r in range(1, len(devices) + 1) for c in itertools.combinations(devices, r)]
    by_speed = sorted(devices, key=lambda d: m.decode_s(d, 1, m.dtype, False, False, 1))
    pos = {d.name: i for i, d in enumerate(devices)}
    return [sorted(by_speed[:k], key=lambda d: pos[d.name]) for k in range(1, len(devices) + 1)]


def quantised_layers(stages: tuple[ServeStage, ...]) -> float:
    """Layers given up to quantisation: int8 counts 1 per layer, int4 2 (the loss the plan trades for memory)."""
    return sum(s.num_layers * {"int8": 1, "int4": 2}.get(s.weight_dtype, 0) for s in stages)


def _key(stages: tuple[ServeStage, ...], p: ServePrediction, quantize: str) -> tuple:
    # "when-needed": full precision wherever any placement allows it, speed second; "allowed": speed alone.
    q = -quantised_layers(stages) if quantize == "when-needed" else 0
    return (p.fits, q, p.decode_tokens_per_s, -p.ttft_s)


def _plan(m: _Model, stages: tuple[ServeStage, ...], strategy: str, excluded: tuple[Excluded, ...] = (),
          groups: int = 0) -> ServePlan:
    return ServePlan(model=m.spec, stages=stages, context_len=m.c, concurrency=m.B, prompt_tokens=m.T,
                     dtype=m.dtype, excluded=excluded, strategy=strategy, pool=m.pool.name,  # type: ignore[arg-type]
                     groups=groups)


def plan_serve(pool: Pool, spec: ModelSpec, *, context_len: int, concurrency: int = 1, prompt_tokens: int | None = None,
               dtype: str = "bf16", quantize: Literal["when-needed", "allowed"] = "when-needed") -> ServeSearch:
    """The fastest placement of `spec` on `pool` for `concurrency` requests of `context_len` tokens.

    quantize="when-needed" quantises only as many layers as memory forces (fewest first, then speed);
    "allowed" lets int8/int4 win on speed alone (weight-only quantisation also shortens bandwidth-bound decode).
    """
    if dtype not in COMPUTE_DTYPES:
        raise PlanError(f"dtype {dtype!r}: not a compute dtype. Fix: use one of {COMPUTE_DTYPES}")
    if not 0 < context_len <= spec.seq_len:
        raise PlanError(f"context length {context_len}: model {spec.name!r} allows 1..{spec.seq_len}. "
                        "Fix: lower --context-len")
    if concurrency < 1:
        raise PlanError(f"concurrency {concurrency}: must be at least 1. Fix: use --concurrency 1 or more")
    T = prompt_tokens or max(1, context_len // 2)
    m = _Model(pool, spec, context_len=context_len, concurrency=concurrency, prompt_tokens=min(T, context_len),
               dtype=dtype)
    devices = list(pool.devices)
    best: tuple[tuple[ServeStage, ...], ServePrediction, tuple, int] | None = None
    with_dev: dict[str, tuple[ServePrediction, tuple]] = {}
    n = 0
    for devs in _candidate_sets(m, devices):
        starts = (dtype,) if quantize == "when-needed" else (dtype, "int8", "int4")
        for layers, wds in (a for s0 in starts for a in _allocate(m, devs, s0)):
            n += 1
            st = _stages(devs, layers, wds)
            for g in range(1, min(concurrency, len(st)) + 1):
                pred = m.predict(st, g)
                if not pred.fits:
                    continue
                key = _key(st, pred, quantize)
                if best is None or key > best[2]:
                    best = (st, pred, key, g)
                for d in devs:
                    if d.name not in with_dev or key > with_dev[d.name][1]:
                        with_dev[d.name] = (pred, key)
    if best is None:
        raise PlanError(f"model {spec.name!r} ({m.costs.total_params / 1e9:.2f}B parameters) with {concurrency} "
                        f"request(s) of {context_len} tokens does not fit pool {pool.name!r} even at int4. "
                        "Fix: add devices, lower --context-len or --concurrency")
    stages, pred, _, groups = best
    used = {s.device for s in stages}
    excluded = []
    for d in devices:
        if d.name in used:
            continue
        got = with_dev.get(d.name, (None,))[0]
        if got is None:
            excluded.append(Excluded(device=d.name, reason="no placement with it fits in memory"))
        else:
            excluded.append(Excluded(device=d.name, reason=(
                f"only slows the job: the best placement using it serves {got.decode_tokens_per_s:.4g} tokens/s "
                f"(first token {got.ttft_s:.3g} s), without it {pred.decode_tokens_per_s:.4g} tokens/s "
                f"({pred.ttft_s:.3g} s)")))
    plan = _plan(m, stages, "chipfuse", tuple(excluded), groups)
    plan.check(pool=pool)
    return ServeSearch(best=ServeScored(plan=plan, prediction=pred), baselines=serve_baselines(m, devices),
                       candidates=n)


def split_even(num_layers: int, devices: list[str]) -> list[int]:
    base, extra = divmod(num_layers, len(devices))
    return [base + (1 if i < extra else 0) for i in range(len(devices))]


def split_by_memory(num_layers: int, memory_bytes: dict[str, int]) -> list[int]:
    """Layers in proportion to each device's memory (as exo and llama.cpp's RPC backend split)."""
    shares = proportional_shares({k: float(v) for k, v in memory_bytes.items()}, num_layers)
    return [shares[k] for k in memory_bytes]


def serve_baselines(m: _Model, devices: list[Device]) -> dict[str, ServeScored | None]:
    """The simple splits over every device of the pool, in the compute dtype (no quantisation)."""
    L = m.spec.num_layers
    use = devices[:L]
    out: dict[str, ServeScored | None] = {}
    for name, layers in (("even", split_even(L, [d.name for d in use])),
                         ("memory-proportional", split_by_memory(L, {d.name: d.memory_bytes for d in use}))):
        keep = [(d, n) for d, n in zip(use, layers, strict=True) if n > 0]
        st = _stages([d for d, _ in keep], [n for _, n in keep], [m.dtype] * len(keep))
        out[name] = ServeScored(plan=_plan(m, st, name), prediction=m.predict(st))
    return out


def predict_serve(plan: ServePlan, pool: Pool) -> ServePrediction:
    """The prediction of a given (e.g. hand-written) plan on `pool`."""
    plan.check(pool=pool)
    m = _Model(pool, plan.model, context_len=plan.context_len, concurrency=plan.concurrency,
               prompt_tokens=plan.prompt_tokens, dtype=plan.dtype)
    return m.predict(plan.stages, plan.groups)


def fixed_plan(pool: Pool, spec: ModelSpec, layers: dict[str, int], *, context_len: int, concurrency: int = 1,
               dtype: str = "bf16", strategy: str = "manual") -> ServePlan:
    """A plan with the given layer counts per device, in the dict's order (benchmarks and tests)."""
    m = _Model(pool, spec, context_len=context_len, concurrency=concurrency,
               prompt_tokens=max(1, context_len // 2), dtype=dtype)
    devs = [pool.device(k) for k, v in layers.items() if v > 0]
    plan = _plan(m, _stages(devs, [layers[d.name] for d in devs], [dtype] * len(devs)), strategy)
    plan.check(pool=pool)
    return plan


def stage_times(plan: ServePlan, pool: Pool) -> list[dict[str, list[float]]]:
    """Per stage, the predicted seconds of one decode step of b = 0..concurrency sequences (`decode_s`) and
    of a prefill of T = 0..context_len tokens (`prefill_s`): what emulated devices are paced to."""
    m = _Model(pool, plan.model, context_len=plan.context_len, concurrency=plan.concurrency,
               prompt_tokens=plan.prompt_tokens, dtype=plan.dtype)
    k, out = len(plan.stages), []
    for i, s in enumerate(plan.stages):
        d = m.ix.dev[s.device]
        first, last = i == 0, i == k - 1
        dec = [m.decode_s(d, s.num_layers, s.weight_dtype, first, last, b) for b in range(plan.concurrency + 1)]
        pre = [0.0]
        for T in range(1, plan.context_len + 1):
            m.T, m.prefill_costs = T, model_costs(plan.model, seq_len=T)
            pre.append(m.prefill_s(d, s.num_layers, last))
        out.append({"decode_s": dec, "prefill_s": pre})
    return out


def fastest_layer_step_s(plan: ServePlan, pool: Pool) -> float:
    """Predicted decode step of one layer for one sequence on the pool's fastest device: the unit emulated
    pacing is scaled by, the same for every plan on one pool (so plans compare on one clock)."""
    m = _Model(pool, plan.model, context_len=plan.context_len, concurrency=plan.concurrency,
               prompt_tokens=plan.prompt_tokens, dtype=plan.dtype)
    return min(m.decode_s(d, 1, plan.dtype, False, False, 1) for d in pool.devices)
