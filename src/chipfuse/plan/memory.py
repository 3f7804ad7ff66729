"""Memory per device: the one model that the planner searches with and the runtime's pre-flight check
refuses with (chipfuse train --plan), and what runtime.parallel.memory really leaves on a device.

Pure arithmetic (no torch): a ModelSpec, a stage's shape and memory strategy, in; bytes out.
Checked against the emulated MemoryMeter in tests/test_memory_plan.py (GPT of chipfuse.model.gpt):

- parameters P, gradients G (fp32: the runtime keeps fp32 parameters and casts for compute),
  optimizer state O: AdamW fp32 8 B/param, bf16 4, int8 2, int4 1 (+ one fp32 scale per block),
  torchao quantising only tensors of >= 4096 values (smaller ones keep 8 B/param).
- the peak: P + O + max(G, A + W), the larger of "just after backward" (all gradients, few
  activations) and "start of backward" (all activations, few gradients); A = saved activations,
  W = parameters gathered for compute under FSDP2. With more than one micro-batch per step the
  gradients of the first are held while the later ones' activations live: P + O + G + A + W (what
  the emulated meter counts in a pipeline, to the byte on tests/test_memory_hf.py's architectures).
- shard full (ZeRO-3): P, G, O divided by the group's data degree; W = the root's embedding and
  head (kept gathered) + two blocks (the one computing and the one prefetched).
  shard grads / optimizer (FSDP2 reshard_after_forward=False, ZeRO-2's peak): P, G, O divided; W = all P.
- offload params: P, G, O in host memory; W as for ZeRO-3. offload optimizer: O in host memory.
- frozen units (plan.freeze, model.converters): P and W unchanged, no G and no O for them. Their
  activations are still counted (an upper bound: autograd keeps none before the first trainable unit).
- tensor parallel t: P, G, O, W divided by t; activations too, except what the runtime keeps
  replicated without sequence parallelism (the two norm inputs and the residual/dropout values,
  REPLICATED_H x h per token): chipfuse's runtime does not shard the sequence.
- activations per token, as the runtime computes them (SDPA's fused attention: no s x s score
  matrix, one log-sum-exp per head): a block keeps 8h + 2f + 2 heads values (GELU MLP: fc1
  output and GELU output; SwiGLU keeps 4f: gate, up, silu(gate), product), a checkpointed block
  its input h, plus, in backward, one block's worth while it is recomputed; the embedding, head and
  loss keep 2h + V + 8. "selective" checkpoints blocks 0, 2, 4, ... (runtime.parallel.memory). Values are
  4 bytes in fp32, 2 in bf16/fp16 (the logits' fp32 copy is counted in V). A Hugging Face stage
  (a family with an activation row: the Hugging Face architectures and the Llama presets) saves what
  transformers' code saves, per architecture: hf_stage_saved_bytes with its row's coefficients
  (Family.saved, read by model.saved), equal to the meter's count (tests/test_memory_hf.py) in fp32 and in
  bf16 autocast (some values fp32, plus a bf16 copy of the weights per micro-batch). The rebuilt
  block is held for one micro-batch at a time, the rest for every micro-batch in flight.
- in flight: 1F1B keeps up to (stages - index) micro-batches of a stage, GPipe all of them.
- on a real chip the runtime itself holds memory too: the CUDA/ROCm context with the BLAS
  workspaces (RUNTIME_CONTEXT_BYTES), communication buffers when the device talks to others
  (COMM_BUFFER_BYTES), and the caching allocator's slack over what tensors use (ALLOC_SLACK):
  usable() leaves that out of a real chip's capacity; an emulated device's cap is exact (the meter
  counts bytes, not allocator pages).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from chipfuse.errors import PlanError
from chipfuse.model.arch import Saved
from chipfuse.model.costs import ModelCosts
from chipfuse.model.registry import family_of
from chipfuse.model.saved import dropout_rates, linear_weight_values, rotary_sets, saved_block_parts
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.dims import GroupDims

RUNTIME_CONTEXT_BYTES = 768 * 2**20
"""CUDA context, cuBLAS/cuDNN workspaces and kernels loaded (measured: 0.5-1 GiB on recent GPUs)."""
COMM_BUFFER_BYTES = 512 * 2**20
"""NCCL's buffers for the communicators a device uses."""
ALLOC_SLACK = 0.06
"""The caching allocator reserves about this much more than live tensors need (fragmentation)."""
REPLICATED_H = 5
"""Activation values per token per block (x h) that tensor parallelism without sequence
parallelism keeps whole on every rank (two norm inputs, residual, dropout)."""

OPT_BYTES_PER_PARAM = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0, "int4": 1.0}
QUANT_BLOCK = {"int8": 256, "int4": 128}
"""Values per fp32 scale in torchao's AdamW8bit / AdamW4bit."""
QUANT_MIN_NUMEL = 4096
QMAP_BYTES = {"int8": 256 * 4, "int4": 16 * 4}
"""The code book each quantised moment carries (fp32)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A stage's memory strategy on one device: the plan's words, with the compute dtype that device
    runs (`device_strategy`). The one type the memory model prices and runtime.parallel.parallelize
    applies; the group's degrees beside it are plan.dims.GroupDims."""

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
    accumulates: bool = False
    """More than one micro-batch per step: the gradients of earlier micro-batches are held while later
    ones' activations live, so the peak adds them (module docstring)."""

    @property
    def peak_bytes(self) -> float:
        return self.params_bytes + self.optimizer_bytes + _grads_and_activations(
            self.grads_bytes, self.activation_bytes + self.gathered_bytes, self.accumulates)

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


def _grads_and_activations(grads: float, activations: float, accumulates: bool) -> float:
    """The peak's share of gradients and activations: both at once when micro-batches accumulate into the
    gradients (the meter counts them so), else the larger (one micro-batch: no gradient while forward)."""
    return grads + activations if accumulates else max(grads, activations)


def tensor_numels(spec: ModelSpec) -> tuple[list[int], list[int], list[int]]:
    """Numels of the parameter tensors of one block, of the embedding, of the head, as the spec's
    family lists them (Family.tensor_numels)."""
    return family_of(spec).tensor_numels(spec)


def _opt_bytes(numels: list[float], optimizer_dtype: str, shards: int) -> float:
    total = 0.0
    for n in numels:
        local = n / shards
        if optimizer_dtype in QUANT_BLOCK and not (local >= QUANT_MIN_NUMEL and n % QUANT_BLOCK[optimizer_dtype] == 0):
            total += 8.0 * local  # torchao leaves small tensors in fp32 state
        else:
            scale = 2 * 4 / QUANT_BLOCK[optimizer_dtype] if optimizer_dtype in QUANT_BLOCK else 0.0
            total += (OPT_BYTES_PER_PARAM[optimizer_dtype] + scale) * local + 2 * QMAP_BYTES.get(optimizer_dtype, 0)
    return total


def stage_activation_bytes(spec: ModelSpec, num_layers: int, checkpoint: str, *, first: bool, last: bool,
                           dtype: str = "fp32", tp: int = 1, seq_len: int | None = None,
                           first_layer: int | None = None, tokens_in_flight: int,
                           micro_batch_tokens: int | None = None) -> float:
    """Saved activation bytes of a stage: what every micro-batch in flight keeps, plus one checkpointed
    block rebuilt in backward, held for one micro-batch at a time (`micro_batch_tokens`; None: as many
    tokens as are in flight, the bound without the split)."""
    mb_tokens = micro_batch_tokens or tokens_in_flight
    if family_of(spec).saved is not None:  # priced by its family's activation row
        # Sequences per micro-batch: the per-micro-batch tensors (weight copies, cos/sin) are shared by them.
        sequences = max(1, micro_batch_tokens // (seq_len or spec.seq_len)) if micro_batch_tokens else 1
        return max(kept * tokens_in_flight + rebuilt * mb_tokens for kept, rebuilt in _hf_places(
            spec, num_layers, checkpoint, first=first, last=last, dtype=dtype, tp=tp,
            seq_len=seq_len or spec.seq_len, first_layer=first_layer, sequences=sequences))
    per_token = activation_bytes_per_token(spec, num_layers, checkpoint, first=first, last=last, dtype=dtype, tp=tp)
    rebuilt = 0.0
    if checkpoint != "none":
        h, t = spec.dim, tp
        mlp = (4 if spec.arch().gated_mlp else 2) * spec.ffn
        rebuilt = DTYPE_BYTES[dtype] * (REPLICATED_H * h + (3 * h + mlp + 2 * spec.num_heads) / t)
    return (per_token - rebuilt) * tokens_in_flight + rebuilt * mb_tokens


def activation_bytes_per_token(spec: ModelSpec, num_layers: int, checkpoint: str, *, first: bool,
                               last: bool, dtype: str = "fp32", tp: int = 1, seq_len: int | None = None,
                               first_layer: int | None = None) -> float:
    """Saved activation bytes per token of a stage of `num_layers` blocks, peak in backward, with one
    checkpointed block rebuilt (stage_activation_bytes holds that one for one micro-batch only).

    A spec whose family has an activation row (a Hugging Face architecture, a 'llama' preset built as
    LlamaForCausalLM) is priced by hf_activation_bytes_per_token; `seq_len` (the plan's,
    default the model's) and `first_layer` (None: the stage's worst place in the model) matter there."""
    if family_of(spec).saved is not None:  # priced by its family's activation row
        return hf_activation_bytes_per_token(spec, num_layers, checkpoint, first=first, last=last, dtype=dtype,
                                             tp=tp, seq_len=seq_len or spec.seq_len, first_layer=first_layer)
    h, t = spec.dim, tp
    mlp = (4 if spec.arch().gated_mlp else 2) * spec.ffn
    block = REPLICATED_H * h + (3 * h + mlp + 2 * spec.num_heads) / t
    if checkpoint == "full":
        saved = num_layers * h + block  # inputs, plus one block recomputed in backward
    elif checkpoint == "selective":
        ck = math.ceil(num_layers / 2)
        saved = ck * h + (num_layers - ck) * block + block
    else:
        saved = num_layers * block
    if last:
        saved += 2 * h + spec.vocab_size / t + 8
    elif first:
        saved += 8
    return DTYPE_BYTES[dtype] * saved


def saved_values(spec: ModelSpec, s: Saved, seq_len: int, tp: int = 1, sequences: int = 1) -> float:
    """Values per token of `s` (model.arch.Saved) for this model, on one of `tp` tensor-parallel ranks:
    heads, head dims, ffn and attention scores split; the hidden width, norms and masks replicated;
    per-micro-batch values shared by its `sequences`."""
    a = spec.arch()
    q, kv = spec.num_heads * a.head_dim, spec.kv_heads * a.head_dim
    split = s.ffn * spec.ffn + s.q * q + s.kv * kv + s.heads * spec.num_heads + s.kv_heads * spec.kv_heads \
        + s.scores * spec.num_heads * seq_len
    return s.h * spec.dim + s.scalars + s.mask * seq_len + s.per_sequence / (seq_len * sequences) + split / tp


def _layer_saved_bytes(spec: ModelSpec, i: int, checkpoint: str, *, dtype: str, tp: int, seq_len: int,
                       training: bool, sequences: int) -> tuple[float, float]:
    """Layer `i`'s part of hf_stage_saved_bytes: (bytes per token the meter sees, bytes per token of the
    block when rebuilt in backward, 0 when it is not checkpointed)."""
    b = DTYPE_BYTES[dtype]
    autocast = dtype == "bf16"
    wide_b = 4 if autocast else b
    wide, half = saved_block_parts(spec, i, seq_len, dtype=dtype, training=training)
    ck = checkpoint == "full" or (checkpoint == "selective" and i % 2 == 0)
    blk = (wide_b * saved_values(spec, wide, seq_len, tp, sequences)
           + b * saved_values(spec, half, seq_len, tp, sequences))
    if autocast:
        blk += b * linear_weight_values(spec) / tp / (seq_len * sequences)
    return (wide_b * spec.dim, blk) if ck else (blk, 0.0)


def hf_stage_saved_bytes(spec: ModelSpec, layers: range, checkpoint: str, *, first: bool, last: bool,
                         dtype: str = "fp32", tp: int = 1, seq_len: int, training: bool = True,
                         sequences: int = 1, per_layer: dict[int, tuple[float, float]] | None = None,
                         ) -> tuple[float, float]:
    """(bytes per token autograd's saved-tensor hooks see, bytes per token of the one block rebuilt in
    backward) of a Hugging Face stage running `layers` (numbers in the whole model).

    Blocks: model.saved.saved_block (per architecture, from transformers' code). A block under
    checkpointing keeps its input (h); torch's checkpoint rebuilds it in backward under its own
    saved-tensor hooks, so the meter (runtime.emulate.device.MemoryMeter) never sees the rebuilt block, a real
    chip holds it: the second figure. "selective" checkpoints layers 0, 2, 4, ... of the whole model.
    Per stage: rotary cos/sin (2 x head_dim per position and set); the token ids (int64, 8 bytes) on
    the first stage, GPT-2's position ids (8 bytes per position) and embedding dropout mask (h); on the
    last, the final norm and the head's input (model.arch: LayerNorm h + 2, RMSNorm 3h + 1, OPT's
    project_out), Gemma 2's soft-capped logits (V), the loss's log-softmax (V in fp32 whatever the
    compute dtype) and targets (int64). Per-micro-batch tensors (cos/sin and position ids:
    one row for the whole micro-batch; Gemma's norm weights; bf16 weight copies) are shared by the
    micro-batch's `sequences` (1, the default, is the upper bound).
    Values are DTYPE_BYTES[dtype] each, except under bf16 autocast (the runtime's bf16 with fp32
    master weights), where model.saved.saved_block_parts splits each block into values kept in fp32 and
    in bf16 (SavedCoeffs.bf16 states the rule): the residual stream, every norm's input, statistics and
    normalised product, a checkpointed block's input, rotary cos/sin and Gemma's (1 + weight) are fp32;
    each linear keeps a bf16 copy of its input and of its weight (model.saved.linear_weight_values, per
    micro-batch, shared by its sequences like cos/sin); on the
    last stage the head's input copy, its weight copy and Gemma 2's soft-capped logits are bf16.
    `per_layer`: _layer_saved_bytes of every layer, computed once when many stages are priced."""
    row = family_of(spec).saved
    assert row is not None, "hf_stage_saved_bytes prices a family with an activation row"
    b = DTYPE_BYTES[dtype]
    autocast = dtype == "bf16"
    wide_b = 4 if autocast else b  # bytes of the values autocast keeps in fp32
    a = spec.arch()
    h = spec.dim
    visible = 0.0
    rebuilt = 0.0
    weights = 0.0  # matmul weights whose bf16 copies a micro-batch keeps
    per_mb = seq_len * sequences  # tokens of a micro-batch: what a per-micro-batch tensor is shared by
    for i in layers:
        seen, built = per_layer[i] if per_layer is not None else _layer_saved_bytes(
            spec, i, checkpoint, dtype=dtype, tp=tp, seq_len=seq_len, training=training, sequences=sequences)
        visible += seen
        rebuilt = max(rebuilt, built)
    sets = rotary_sets(spec, layers)
    if checkpoint != "full" and sets:
        visible += wide_b * sets * 2 * a.head_dim / sequences  # cos, sin: head_dim each per position
    drop = dropout_rates(spec) if training else {}
    if first:
        visible += 8  # token ids
        if row.position_ids:
            visible += 8 / sequences  # position ids (per position)
        if row.embed_scale:
            visible += 4 / per_mb  # the embedding's scale (a scalar tensor per micro-batch)
        if drop.get("embed", 0.0) > 0:
            visible += wide_b * h  # the embedding dropout's mask (the embedding's output is fp32)
        if row.project_io and a.embed_dim != h:
            visible += b * a.embed_dim  # project_in's input
            weights += a.embed_dim * h
    if last:
        if row.project_io:
            proj = a.embed_dim != h
            tail = Saved(h=(1 if a.final_norm else 0) + (1 if proj else 0) + (0 if proj else 1),
                         scalars=2 if a.final_norm else 0)
            head_in = a.embed_dim if proj else 0
            weights += a.embed_dim * h if proj else 0
        elif a.norm == "layernorm":
            tail, head_in = Saved(h=2, scalars=2), 0
        else:
            tail, head_in = Saved(h=3, scalars=1, per_sequence=h if row.norm_plus_one else 0), 0
        weights += spec.vocab_size * (a.embed_dim if row.project_io else h)
        # The last stage soft-caps the logits wherever the config sets the cap (model.hf.HFStage).
        cap = (spec.hf_config or {}).get("final_logit_softcapping")
        if autocast:
            # The head (OPT: project_out) reads a bf16 copy of the fp32 norm output: one h moves to bf16.
            visible += 4 * saved_values(spec, tail + Saved(h=-1), seq_len, 1, sequences) + b * h
        else:
            visible += b * saved_values(spec, tail, seq_len, 1, sequences)
        visible += b * (head_in + (spec.vocab_size / tp if cap else 0.0))
        visible += 4 * spec.vocab_size / tp + 8 + 4 / per_mb  # log-softmax in fp32, int64 targets, the loss
    if autocast:
        visible += b * weights / tp / per_mb
    return visible, rebuilt


def _hf_places(spec: ModelSpec, num_layers: int, checkpoint: str, *, first: bool, last: bool, dtype: str, tp: int,
               seq_len: int, first_layer: int | None, sequences: int = 1) -> list[tuple[float, float]]:
    """hf_stage_saved_bytes at `first_layer`, or at every place the stage could take in the model when None
    (the planner's stage shapes; the caller keeps the worst)."""
    starts = [first_layer] if first_layer is not None else (
        [0] if first else [spec.num_layers - num_layers] if last else range(max(1, spec.num_layers - num_layers + 1)))
    key = ("hf_layer_saved", checkpoint, dtype, tp, seq_len, sequences)
    per_layer = spec.memo.get(key)
    if per_layer is None:
        per_layer = spec.memo[key] = {
            i: _layer_saved_bytes(spec, i, checkpoint, dtype=dtype, tp=tp, seq_len=seq_len, training=True,
                                  sequences=sequences) for i in range(spec.num_layers)}
    return [hf_stage_saved_bytes(spec, range(s, s + num_layers), checkpoint, first=first, last=last, dtype=dtype,
                                 tp=tp, seq_len=seq_len, sequences=sequences, per_layer=per_layer) for s in starts]


def hf_activation_bytes_per_token(spec: ModelSpec, num_layers: int, checkpoint: str, *, first: bool, last: bool,
                                  dtype: str, tp: int, seq_len: int, first_layer: int | None) -> float:
    """hf_stage_saved_bytes's two terms added (the meter's count and the block a real chip rebuilds), at
    the stage's worst place when `first_layer` is None."""
    return max(sum(f) for f in _hf_places(spec, num_layers, checkpoint, first=first, last=last, dtype=dtype, tp=tp,
                                          seq_len=seq_len, first_layer=first_layer))


def stage_device_memory(spec: ModelSpec, strategy: Strategy, *, device: str, capacity_bytes: int, num_layers: int,
                        first: bool, last: bool, group_size: int, tokens_in_flight: int, tp: int = 1,
                        seq_len: int | None = None, first_layer: int | None = None,
                        micro_batch_tokens: int | None = None, micro_batches: int = 1,
                        frozen: frozenset[str] = frozenset()) -> DeviceMemory:
    """Predicted peak of one device of a stage group: `group_size` data (shard) ranks, each of `tp`
    tensor-parallel ranks (parameters split t ways). `frozen`: units without gradients or optimizer
    state (model.converters; needs `first_layer` to place the stage's blocks)."""
    block, embed, head = ([n / tp for n in x] for x in tensor_numels(spec))
    numels = block * num_layers + (embed if first else []) + (head if last else [])
    layers = range(first_layer, first_layer + num_layers) if first_layer is not None else range(0)
    trained = numels if not frozen else (
        [n for i in layers if f"block{i}" not in frozen for n in block]
        + (embed if first and "embed" not in frozen else []) + (head if last and "head" not in frozen else []))
    n_params = float(sum(numels))
    root = float(sum(embed if first else []) + sum(head if last else []))
    # The ZeRO level that runs (plan.dims): over one data rank a shard level divides nothing.
    zero = GroupDims(tp=tp, dp=group_size, shard=strategy.shard).zero
    sharded = zero != "none" or strategy.offload == "params"
    n = group_size if zero != "none" else 1
    wbytes = DTYPE_BYTES[strategy.dtype] if sharded else 4
    p = 4 * n_params / n
    g = 4 * sum(trained) / n
    o = _opt_bytes(trained, strategy.optimizer_dtype, n)
    if not sharded:
        gathered = 0.0
    elif zero in ("full", "none"):
        gathered = wbytes * (root + 2 * sum(block) if num_layers > 1 else root + sum(block))
    else:
        gathered = wbytes * n_params
    if strategy.offload == "params":
        p = g = o = 0.0
    elif strategy.offload == "optimizer":
        o = 0.0
    act = stage_activation_bytes(spec, num_layers, strategy.checkpoint, first=first, last=last, dtype=strategy.dtype,
                                 tp=tp, seq_len=seq_len, first_layer=first_layer, tokens_in_flight=tokens_in_flight,
                                 micro_batch_tokens=micro_batch_tokens)
    return DeviceMemory(device=device, capacity_bytes=capacity_bytes, params_bytes=p, grads_bytes=g,
                        optimizer_bytes=o, activation_bytes=act, gathered_bytes=gathered,
                        accumulates=micro_batches > 1)


def compute_dtype(plan_dtype: str, chip) -> str:
    """bf16 where the chip has it; chips without (T4, V100, Turing) compute a bf16 plan in fp32 (bf16
    emulated in software would be slower than fp32 there). An fp16 plan (with loss scaling) runs in
    fp16 on every chip: the planner offers it for chips without bf16, the runtime refuses it today."""
    return plan_dtype if plan_dtype != "bf16" or chip.has_bf16 else "fp32"


def usable(memory_bytes: int, *, emulated: bool = False, runtime_bytes: int | None = None) -> int:
    """Bytes a job's tensors may use on a device of `memory_bytes`: an emulated cap is exact; a real chip
    loses its runtime context and communication buffers (`runtime_bytes` when measured by a profile),
    and the allocator's slack (module docstring)."""
    if emulated:
        return int(memory_bytes)
    own = RUNTIME_CONTEXT_BYTES + COMM_BUFFER_BYTES if runtime_bytes is None else runtime_bytes
    return max(0, int((memory_bytes - own) / (1 + ALLOC_SLACK)))


def usable_bytes(device, runtime_bytes: int | None = None) -> int:
    """usable() of a pool device (cluster.pool.Device)."""
    return usable(device.memory_bytes, emulated=device.emulated, runtime_bytes=runtime_bytes)


def reserved_bytes(peak_bytes: float, *, emulated: bool = False) -> float:
    """What a real chip's memory reading (reserved by the allocator, plus the runtime's own) shows for a
    predicted tensor peak: the inverse of usable()."""
    if emulated:
        return peak_bytes
    return peak_bytes * (1 + ALLOC_SLACK) + RUNTIME_CONTEXT_BYTES + COMM_BUFFER_BYTES


def device_strategy(plan, stage, chip) -> Strategy:
    """The memory strategy `stage` (plan.plan.Stage) of `plan` runs on a device of `chip`: the plan's
    words, computing in fp32 where the chip lacks bf16 (compute_dtype)."""
    return Strategy(checkpoint=stage.checkpoint, shard=stage.shard, offload=stage.offload,
                    dtype=compute_dtype(plan.dtype, chip), optimizer_dtype=plan.optimizer_dtype)


def plan_memory(plan, pool) -> list[DeviceMemory]:
    """Predicted peak of every device of `plan` (plan.plan.Plan) on `pool` (cluster.pool.Pool)."""
    from chipfuse.model.converters import frozen_units

    out: list[DeviceMemory] = []
    frozen = frozen_units(plan)
    for r in plan.replicas:
        num_stages = len(r.stages)
        for j, s in enumerate(r.stages):
            in_flight = r.num_micro_batches if plan.schedule == "gpipe" else min(r.num_micro_batches, num_stages - j)
            group = s.dp_degree  # the group splits each micro-batch over its data degree
            per_device_mb = math.ceil(r.micro_batch_size / group)  # the group splits each micro-batch
            for d in s.devices:
                strategy = device_strategy(plan, s, pool.device(d).chip)
                mem = stage_device_memory(plan.model, strategy, device=d, capacity_bytes=usable_bytes(pool.device(d)),
                                          num_layers=s.num_layers, first=j == 0, last=j == num_stages - 1,
                                          group_size=group, tokens_in_flight=max(1, in_flight) * per_device_mb * plan.seq_len,
                                          tp=s.tp_degree, seq_len=plan.seq_len, first_layer=s.first_layer,
                                          micro_batch_tokens=per_device_mb * plan.seq_len,
                                          micro_batches=r.num_micro_batches, frozen=frozen)
                out.append(mem)
    return out


def check_plan_memory(plan, pool, source: str = "<plan>") -> list[DeviceMemory]:
    """Refuse, before any worker starts, a plan whose predicted peak passes a device's memory, and
    offload on CPU devices, and fp16 (the runtime has no loss-scaling path yet). Returns the predictions
    when every device fits."""
    if plan.dtype == "fp16":
        raise PlanError(f"{source}: dtype: is 'fp16', which chipfuse train does not run yet (no loss scaling). "
                        "Fix: use dtype \"bf16\" (chips without bf16 then compute in fp32) or \"fp32\"")
    for r_i, r in enumerate(plan.replicas):
        for s_i, s in enumerate(r.stages):
            for d in s.devices:
                if s.offload != "none" and pool.device(d).kind.host_memory:
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


# ---------------------------------------------------------------------------------------------- the planner's view
OPT_BYTES = {k: v / 2 for k, v in OPT_BYTES_PER_PARAM.items()}
"""Bytes per parameter of one Adam moment."""


@dataclass(frozen=True, kw_only=True)
class StateBytes:
    """Bytes per parameter of each kind of state (the runtime keeps fp32 parameters and gradients)."""

    weights: float
    grads: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


def state_bytes(dtype: str, optimizer_dtype: str) -> StateBytes:
    return StateBytes(weights=4.0, grads=4.0, master=0.0, optimizer=OPT_BYTES_PER_PARAM[optimizer_dtype])


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
    """Bytes on one device of a stage group, by kind (DeviceMemory's terms, without a device)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    """Parameters gathered for compute (FSDP2)."""
    accumulates: bool = False
    """DeviceMemory.accumulates."""

    @property
    def total(self) -> int:
        """The peak: P + O + max(G, A + W), or P + O + G + A + W over several micro-batches (module docstring)."""
        return int(math.ceil(self.weights + self.optimizer + _grads_and_activations(
            self.grads, self.activations + self.transient, self.accumulates)))

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
    micro_batches: int = 1
    """Micro-batches per step (more than one: gradients accumulate while activations live)."""

    @property
    def data_degree(self) -> int:
        return self.group_size // self.tp

    def tokens_per_device(self, seq_len: int) -> int:
        return math.ceil(self.micro_batch_size / self.data_degree) * seq_len


def stage_memory(costs: ModelCosts, sh: StageShape, *, dtype: str, optimizer_dtype: str) -> StageMemory:
    """stage_device_memory for a stage shape: `dtype` is what its devices compute in."""
    dm = stage_device_memory(
        costs.spec, Strategy(checkpoint=sh.checkpoint, shard=sh.shard, offload=sh.offload, dtype=dtype,
                             optimizer_dtype=optimizer_dtype),
        device="", capacity_bytes=0, num_layers=sh.num_layers, first=sh.is_first, last=sh.is_last,
        group_size=sh.data_degree, tokens_in_flight=sh.in_flight * sh.tokens_per_device(costs.seq_len), tp=sh.tp,
        seq_len=costs.seq_len, micro_batch_tokens=sh.tokens_per_device(costs.seq_len), micro_batches=sh.micro_batches)
    return StageMemory(weights=dm.params_bytes, grads=dm.grads_bytes, optimizer=dm.optimizer_bytes,
                       activations=dm.activation_bytes, transient=dm.gathered_bytes, accumulates=dm.accumulates)


def max_layers_fitting(costs: ModelCosts, sh: StageShape, capacity: int, *, dtype: str, optimizer_dtype: str) -> int:
    """The most blocks a stage of this shape can hold within `capacity` usable bytes."""
    n = 0
    while n < costs.num_layers and stage_memory(costs, replace(sh, num_layers=n + 1), dtype=dtype,
                                                optimizer_dtype=optimizer_dtype).total <= capacity:
        n += 1
    return n
