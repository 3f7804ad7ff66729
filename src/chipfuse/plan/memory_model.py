"""Predicted memory per device of a plan, and the pre-flight check that refuses one that cannot fit.

Pure arithmetic (no torch): a ModelSpec, a stage's memory strategy and its group, in; bytes out.
It describes what runtime.memory really leaves on a device (checked against the emulated
MemoryMeter in tests/test_memory_plan.py), for the GPT of chipfuse.model.gpt:

- parameters P, gradients G (parameter dtype, fp32 master weights), optimizer state O:
  AdamW fp32 8 B/param, bf16 4, int8 2, int4 1 (+ one fp32 scale per block), torchao quantising
  only tensors of >= 4096 values (smaller ones keep 8 B/param).
- the peak: P + O + max(G, A + W), the larger of "just after backward" (all gradients, few
  activations) and "start of backward" (all activations, few gradients); A = saved activations,
  W = parameters gathered for compute under FSDP2.
- shard full (ZeRO-3): P, G, O divided by the group size; W = the root's embedding and head (kept
  gathered) + two blocks (the one computing and the one prefetched).
  shard grads / optimizer (FSDP2 reshard_after_forward=False, ZeRO-2's peak): G, O divided; W = all P.
- offload params: P, G, O in host memory; W as for ZeRO-3 (or all P without resharding).
  offload optimizer: O in host memory.
- activations per token, fp32 (measured with the meter for this GPT, SDPA attention): a block keeps
  16h + 2 heads values; a checkpointed block keeps its input, h values, plus, in backward, one
  block's worth while it is recomputed; the embedding, head and loss keep 2h + V + 8.
  "selective" checkpoints blocks 0, 2, 4, ... (runtime.memory). bf16 compute is counted as fp32
  activations (autocast keeps norms and the loss in fp32; an upper bound) and bf16 gathered weights.
- in flight: 1F1B keeps up to (stages - index) micro-batches of a stage, GPipe all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec

OPT_BYTES_PER_PARAM = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0, "int4": 1.0}
QUANT_BLOCK = {"int8": 256, "int4": 128}
"""Values per fp32 scale in torchao's AdamW8bit / AdamW4bit."""
QUANT_MIN_NUMEL = 4096
QMAP_BYTES = {"int8": 256 * 4, "int4": 16 * 4}
"""The code book each quantised moment carries (fp32)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
REAL_CHIP_USABLE = 0.92
"""Share of a real accelerator's memory a job can use (runtime context, allocator fragmentation).
Emulated caps are exact: the meter counts bytes, not allocator pages."""


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A stage's memory strategy (the plan's words) and the settings it is priced with."""

    checkpoint: str = "none"
    shard: str = "none"
    offload: str = "none"
    dtype: str = "fp32"
    optimizer_dtype: str = "fp32"

    @property
    def label(self) -> str:
        parts = [f"ckpt={self.checkpoint}" if self.checkpoint != "none" else "",
                 f"shard={self.shard}" if self.shard != "none" else "",
                 f"offload={self.offload}" if self.offload != "none" else "",
                 self.dtype if self.dtype != "fp32" else "",
                 f"opt={self.optimizer_dtype}" if self.optimizer_dtype != "fp32" else ""]
        return " ".join(p for p in parts if p) or "plain"


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """Predicted peak bytes of one device, by what holds them."""

    device: str
    capacity_bytes: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    gathered_bytes: float
    """Parameters gathered by FSDP2 for compute (transient)."""

    @property
    def peak_bytes(self) -> float:
        return self.params_bytes + self.optimizer_bytes + max(self.grads_bytes,
                                                              self.activation_bytes + self.gathered_bytes)

    @property
    def missing_bytes(self) -> float:
        return max(0.0, self.peak_bytes - self.capacity_bytes)

    @property
    def limit(self) -> str:
        """What holds most of the peak: the term to attack next."""
        terms = {"parameters": self.params_bytes, "gradients": self.grads_bytes,
                 "optimizer state": self.optimizer_bytes, "activations": self.activation_bytes,
                 "gathered parameters": self.gathered_bytes}
        return max(terms, key=terms.__getitem__)


def gpt_tensor_numels(spec: ModelSpec) -> tuple[list[int], list[int], list[int]]:
    """Numels of the parameter tensors of one block, of the embedding, of the head (model.gpt.GPT)."""
    h, f, V = spec.dim, spec.ffn, spec.vocab_size
    block = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, f * h, f, h * f, h]
    embed = [V * h, spec.seq_len * h]
    head = [h, h, V * h]
    return block, embed, head


def _opt_bytes(numels: list[int], optimizer_dtype: str, shards: int) -> float:
    total = 0.0
    for n in numels:
        local = n / shards
        if optimizer_dtype in QUANT_BLOCK and not (local >= QUANT_MIN_NUMEL and n % QUANT_BLOCK[optimizer_dtype] == 0):
            total += 8.0 * local  # torchao leaves small tensors in fp32 state
        else:
            scale = 2 * 4 / QUANT_BLOCK[optimizer_dtype] if optimizer_dtype in QUANT_BLOCK else 0.0
            total += (OPT_BYTES_PER_PARAM[optimizer_dtype] + scale) * local + 2 * QMAP_BYTES.get(optimizer_dtype, 0)
    return total


def activation_bytes_per_token(spec: ModelSpec, num_layers: int, checkpoint: str, *, first: bool,
                               last: bool) -> float:
    """Saved activation bytes per token of a stage of `num_layers` blocks (fp32), peak in backward."""
    h = spec.dim
    block = 16 * h + 2 * spec.num_heads
    if checkpoint == "full":
        saved = num_layers * h + block  # inputs, plus one block recomputed in backward
    elif checkpoint == "selective":
        ck = math.ceil(num_layers / 2)
        saved = ck * h + (num_layers - ck) * block + block
    else:
        saved = num_layers * block
    if last:
        saved += 2 * h + spec.vocab_size + 8
    elif first:
        saved += 8
    return 4.0 * saved


def stage_device_memory(spec: ModelSpec, strategy: Strategy, *, device: str, capacity_bytes: int, num_layers: int,
                        first: bool, last: bool, group_size: int, tokens_in_flight: int) -> DeviceMemory:
    """Predicted peak of one device of a stage group of `group_size` devices."""
    block, embed, head = gpt_tensor_numels(spec)
    numels = block * num_layers + (embed if first else []) + (head if last else [])
    n_params = float(sum(numels))
    root = float(sum(embed if first else []) + sum(head if last else []))
    sharded = strategy.shard != "none" or strategy.offload == "params"
    n = group_size if strategy.shard != "none" else 1
    wbytes = DTYPE_BYTES[strategy.dtype] if sharded else 4
    p = 4 * n_params / n
    g = 4 * n_params / n
    o = _opt_bytes(numels, strategy.optimizer_dtype, n)
    if not sharded:
        gathered = 0.0
    elif strategy.shard in ("full", "none"):
        gathered = wbytes * (root + 2 * sum(block) if num_layers > 1 else root + sum(block))
    else:
        gathered = wbytes * n_params
    if strategy.offload == "params":
        p = g = o = 0.0
    elif strategy.offload == "optimizer":
        o = 0.0
    act = activation_bytes_per_token(spec, num_layers, strategy.checkpoint, first=first, last=last) * tokens_in_flight
    return DeviceMemory(device=device, capacity_bytes=capacity_bytes, params_bytes=p, grads_bytes=g,
                        optimizer_bytes=o, activation_bytes=act, gathered_bytes=gathered)


def compute_dtype(plan_dtype: str, chip) -> str:
    """bf16 where the chip has it; chips without (T4, V100) compute in fp32: chipfuse has no fp16
    loss-scaling path, and bf16 emulated in software would be slower than fp32 there."""
    return plan_dtype if plan_dtype != "bf16" or chip.has_bf16 else "fp32"


def usable_bytes(device) -> int:
    """Bytes a job may use on a pool device (cluster.pool.Device)."""
    return int(device.memory_bytes if device.emulated else device.memory_bytes * REAL_CHIP_USABLE)


def plan_memory(plan, pool) -> list[DeviceMemory]:
    """Predicted peak of every device of `plan` (plan.plan.Plan) on `pool` (cluster.pool.Pool)."""
    out: list[DeviceMemory] = []
    for r in plan.replicas:
        num_stages = len(r.stages)
        for j, s in enumerate(r.stages):
            in_flight = r.num_micro_batches if plan.schedule == "gpipe" else min(r.num_micro_batches, num_stages - j)
            group = len(s.devices) // s.tp_degree  # data/shard degree inside the stage
            per_device_mb = math.ceil(r.micro_batch_size / group)  # the group splits each micro-batch
            for d in s.devices:
                strategy = Strategy(checkpoint=s.checkpoint, shard=s.shard, offload=s.offload,
                                    dtype=compute_dtype(plan.dtype, pool.device(d).chip),
                                    optimizer_dtype=plan.optimizer_dtype)
                mem = stage_device_memory(plan.model, strategy, device=d, capacity_bytes=usable_bytes(pool.device(d)),
                                          num_layers=s.num_layers, first=j == 0, last=j == num_stages - 1,
                                          group_size=group, tokens_in_flight=max(1, in_flight) * per_device_mb * plan.seq_len)
                if s.tp_degree > 1:  # tensor parallel splits the block weights and most activations
                    mem = DeviceMemory(**{**mem.__dict__, **{k: getattr(mem, k) / s.tp_degree for k in (
                        "params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes", "gathered_bytes")}})
                out.append(mem)
    return out


def check_plan_memory(plan, pool, source: str = "<plan>") -> list[DeviceMemory]:
    """Refuse, before any worker starts, a plan whose predicted peak passes a device's memory, and
    offload on CPU devices. Returns the predictions when every device fits."""
    for r_i, r in enumerate(plan.replicas):
        for s_i, s in enumerate(r.stages):
            for d in s.devices:
                if s.offload != "none" and pool.device(d).chip.vendor == "cpu":
                    raise PlanError(
                        f"{source}: replicas[{r_i}].stages[{s_i}].offload: is {s.offload!r} but device {d!r} is a CPU, "
                        "whose memory is host memory: offload would save nothing. Fix: set offload = \"none\" "
                        "and save memory with shard or checkpoint")
    mems = plan_memory(plan, pool)
    over = [m for m in mems if m.missing_bytes > 0]
    if over:
        m = max(over, key=lambda m: m.missing_bytes)
        MiB = 2**20
        raise PlanError(
            f"{source}: device {m.device!r} needs {m.peak_bytes / MiB:.1f} MiB, it has {m.capacity_bytes / MiB:.1f} MiB: "
            f"{m.missing_bytes / MiB:.1f} MiB missing (largest term: {m.limit}; {len(over)} device(s) over). "
            "Fix: turn on activation checkpointing, sharding, an 8-bit optimizer or offload for its stage, "
            "lower micro_batch_size, or let `chipfuse plan` choose a plan that fits")
    return mems


def best_shard_group(capacity_bytes: dict[str, int], need_bytes: Callable[[int], float]) -> tuple[str, ...]:
    """The devices to shard one stage over when their memories differ.

    FSDP2 shards evenly, so each of k members needs the same `need_bytes(k)` (its 1/k of the state
    plus what no sharding divides: activations, gathered parameters), and a group is only as large
    as its smallest member. Adding a small device can therefore make a group fail that fits without
    it. Among the k largest devices, for every k, keep the largest group that fits (more members:
    more compute and headroom), or () when none does. Devices left out serve in another replica
    or stage, or are excluded.
    """
    ranked = sorted(capacity_bytes, key=lambda d: (-capacity_bytes[d], d))
    for k in range(len(ranked), 0, -1):
        if need_bytes(k) <= min(capacity_bytes[d] for d in ranked[:k]):
            return tuple(ranked[:k])
    return ()
