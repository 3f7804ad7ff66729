"""Memory per device: the conservative model every plan is checked against.

Per parameter of a stage (after dividing by the tensor-parallel degree t):
  weights  w = 2 (bf16) or 4 (fp32) bytes;   gradients g = w
  master   4 bytes when computing in bf16 (fp32 master weights), else 0
  optimizer (Adam m and v) 2 x {fp32: 4, bf16: 2, int8: 1, int4: 0.5} bytes
Sharding over the group's data ranks d = devices / t (ZeRO via FSDP2):
  optimizer -> master and optimizer / d;  grads -> also g / d;  full -> also w / d, plus two
  blocks' gathered weights (the one computing and the one prefetched).
Offload: optimizer -> master and optimizer in host memory; params -> weights too, but two blocks
  stay resident while they compute.
Activations: tokens per micro-batch per device (ceil(mbs / d) x seq_len) x bytes per token per block
  (chipfuse.model.costs) / t (sequence parallel) x blocks x micro-batches in flight (1F1B: p - i on
  stage i; GPipe: all m). Full checkpointing adds one block's un-checkpointed activations (rebuilt in
  backward). The last stage adds its logits (compute dtype + an fp32 copy for the loss); every stage
  two boundary buffers (send and receive).
A device may use USABLE_FRACTION of its memory: the rest is left for the runtime context, kernels'
workspace and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chipfuse.model.costs import DTYPE_BYTES, ModelCosts

USABLE_FRACTION = 0.9
OPT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def usable(memory_bytes: int) -> int:
    return int(memory_bytes * USABLE_FRACTION)


@dataclass(frozen=True, kw_only=True)
class StateBytes:
    """Bytes per parameter of each kind of state."""

    weights: float
    grads: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


def state_bytes(dtype: str, optimizer_dtype: str) -> StateBytes:
    w = DTYPE_BYTES[dtype]
    return StateBytes(weights=w, grads=w, master=4.0 if dtype != "fp32" else 0.0,
                      optimizer=2 * OPT_BYTES[optimizer_dtype])


def stage_params(costs: ModelCosts, num_layers: int, *, is_first: bool, is_last: bool) -> int:
    """Parameters a stage holds: its blocks, the embedding on the first, the head on the last.

    With tied embeddings and more than one stage, the last stage keeps its own copy of the matrix.
    """
    p = num_layers * costs.block_params
    if is_first:
        p += costs.embed_params
    if is_last:
        p += costs.head_params
        if costs.spec.tie_embeddings and not is_first:
            p += costs.spec.vocab_size * costs.spec.dim
    return p


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Bytes on one device of a stage group, by kind."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    transient: float

    @property
    def total(self) -> int:
        return int(math.ceil(self.weights + self.grads + self.optimizer + self.activations + self.transient))

    def to_dict(self) -> dict[str, int]:
        return {"weights": int(self.weights), "grads": int(self.grads), "optimizer": int(self.optimizer),
                "activations": int(self.activations), "transient": int(self.transient), "total": self.total}


@dataclass(frozen=True, kw_only=True)
class StageShape:
    """Everything about a stage that its memory and time depend on (no device names)."""

    num_layers: int
    is_first: bool
    is_last: bool
    group_size: int
    tp: int = 1
    checkpoint: str = "none"
    shard: str = "none"
    offload: str = "none"
    micro_batch_size: int = 1
    in_flight: int = 1
    """Micro-batches whose activations the stage holds at once."""

    @property
    def data_degree(self) -> int:
        return self.group_size // self.tp

    def tokens_per_device(self, seq_len: int) -> int:
        return math.ceil(self.micro_batch_size / self.data_degree) * seq_len


def stage_memory(costs: ModelCosts, sh: StageShape, *, dtype: str, optimizer_dtype: str) -> StageMemory:
    sb = state_bytes(dtype, optimizer_dtype)
    t, d = sh.tp, sh.data_degree
    params = stage_params(costs, sh.num_layers, is_first=sh.is_first, is_last=sh.is_last) / t
    block = costs.block_params / t
    opt_div = d if sh.shard in ("optimizer", "grads", "full") else 1
    grad_div = d if sh.shard in ("grads", "full") else 1
    w_div = d if sh.shard == "full" else 1
    weights = params * sb.weights / w_div
    transient = 0.0
    if sh.shard == "full" and d > 1:
        transient += 2 * block * sb.weights
    if sh.offload == "params":
        weights = 0.0
        transient = max(transient, 2 * block * sb.weights)
    grads = params * sb.grads / grad_div
    optimizer = 0.0 if sh.offload in ("optimizer", "params") else params * (sb.master + sb.optimizer) / opt_div
    tokens = sh.tokens_per_device(costs.seq_len)
    per_block = tokens * costs.act_bytes(sh.checkpoint, dtype) / t
    activations = per_block * sh.num_layers * sh.in_flight
    if sh.checkpoint != "none":
        transient += tokens * costs.act_bytes("none", dtype) / t
    if sh.is_last:
        transient += tokens * costs.logits_bytes_per_token(dtype) / t
    transient += 2 * tokens * costs.spec.dim * DTYPE_BYTES[dtype]
    return StageMemory(weights=weights, grads=grads, optimizer=optimizer, activations=activations,
                       transient=transient)


def max_layers_fitting(costs: ModelCosts, sh: StageShape, capacity: int, *, dtype: str, optimizer_dtype: str) -> int:
    """The most blocks a stage of this shape can hold within `capacity` bytes (memory is linear in blocks)."""
    zero = stage_memory(costs, _with_layers(sh, 0), dtype=dtype, optimizer_dtype=optimizer_dtype).total
    one = stage_memory(costs, _with_layers(sh, 1), dtype=dtype, optimizer_dtype=optimizer_dtype).total
    per = max(1, one - zero)
    return max(0, (usable(capacity) - zero) // per)


def _with_layers(sh: StageShape, n: int) -> StageShape:
    from dataclasses import replace

    return replace(sh, num_layers=n)
