"""What one transformer block, the embedding and the head cost: FLOPs, parameters and activation bytes.

Pure arithmetic on a ModelSpec; the planner's cost model multiplies these by device rates.
Formulas (h = dim, f = ffn, s = seq_len, kv = kv_heads * head_dim, V = vocab):

- parameters per block (ModelSpec.arch() says which terms a model has): attention 2h*q + 2h*kv
  (q, o + k, v; q = heads * head_dim, which need not be h) plus biases where the architecture has
  them; MLP 2hf (GELU) or 3hf (gated: SwiGLU / GeGLU); each norm h (RMSNorm) or 2h (LayerNorm);
  Qwen3 / Gemma 3 add a norm over head_dim on queries and keys. Embedding V*e (+ learned
  positions, + OPT's project_in/out when e != h); head: final norm + V*e unless tied.
- forward FLOPs per token per block: 2 x matmul parameters + 4sh (QK^T and AV over the whole
  sequence; the causal half is not subtracted, as in Megatron's MFU convention). Backward = 2 x forward.
  A frozen block (model.converters) computes input gradients only: its matmuls' backward halves.
- head: 2hV forward FLOPs per token; the embedding is a gather (no FLOPs).
- activation bytes per token per block, 16-bit, with sequence parallelism and a fused (flash / SDPA)
  attention that stores no s x s score matrix (Korthikanti et al. 2022, generalised to GQA and SwiGLU):
  attention 7h + 4kv (input, q, k, v, output-projection input, dropout mask), two norm inputs 4h,
  MLP 2h + 4f (gpt: fc1 output and GELU output) or 2h + 8f (llama: gate, up, silu(gate), product)
  plus a dropout mask of h. gpt with f = 4h gives the familiar 34h.
  * selective checkpointing is layer-selective, as the runtime applies it (torchtitan's mode with
    frequency 2): every other block is fully checkpointed, so a block keeps on average half of
    "none" plus half of "full", and recomputes half a forward in backward.
  * full checkpointing keeps only the block input (2h), and re-runs the forward in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipfuse.model.spec import ModelSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True, kw_only=True)
class ModelCosts:
    """Per-block and embedding/head costs of a model at one sequence length."""

    spec: ModelSpec
    seq_len: int
    block_params: int
    block_matmul_params: int
    embed_params: int
    """Token (and, for gpt, position) embedding."""
    head_params: int
    """Final norm plus the output projection (0 projection when tied, but see `tied`)."""
    block_fwd_flops_per_token: float
    head_fwd_flops_per_token: float
    attn_core_fwd_flops_per_token: float
    """The part selective checkpointing recomputes (QK^T, softmax, AV)."""
    act_bytes_per_token: dict[str, float]
    """Block activation bytes per token in 16-bit, by checkpoint mode (none, selective, full)."""

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def total_params(self) -> int:
        return self.embed_params + self.num_layers * self.block_params + self.head_params

    def trainable_params(self, layers: range, *, first: bool, last: bool, frozen: frozenset[str] = frozenset()) -> int:
        """Parameters of a stage holding `layers` (and the embedding when first, the head when last)
        that are trained: those of units not in `frozen` (model.converters)."""
        p = sum(self.block_params for i in layers if f"block{i}" not in frozen)
        p += self.embed_params if first and "embed" not in frozen else 0
        return p + (self.head_params if last and "head" not in frozen else 0)

    @property
    def frozen_backward_fraction(self) -> float:
        """The part of a block's backward that a frozen block skips: its weight gradients, half of the
        matmuls' backward (input gradients still flow through it to trainable layers below). The
        attention core has no weights and is computed in full."""
        mm = 2 * self.block_matmul_params
        return 0.5 * mm / (mm + self.attn_core_fwd_flops_per_token)

    def act_bytes(self, checkpoint: str, dtype: str) -> float:
        """Activation bytes per token per block kept for backward, in the compute dtype."""
        return self.act_bytes_per_token[checkpoint] * DTYPE_BYTES[dtype] / 2

    def model_flops_per_token(self) -> float:
        """Forward + backward FLOPs per trained token (no recomputation): the MFU numerator."""
        return 3 * (self.num_layers * self.block_fwd_flops_per_token + self.head_fwd_flops_per_token)

    def kv_cache_bytes_per_token(self, dtype: str) -> float:
        """Keys and values one block keeps per cached token when generating (inference), in `dtype`."""
        kv = self.spec.kv_heads * (self.spec.dim // self.spec.num_heads)
        return 2 * kv * DTYPE_BYTES[dtype]

    def logits_bytes_per_token(self, dtype: str) -> float:
        """Logits in the compute dtype plus their fp32 copy for the softmax/loss (transient, last stage)."""
        return self.spec.vocab_size * (DTYPE_BYTES[dtype] + 4)


def model_costs(spec: ModelSpec, seq_len: int | None = None) -> ModelCosts:
    s = seq_len or spec.seq_len
    a = spec.arch()
    h, f, V, e = spec.dim, spec.ffn, spec.vocab_size, a.embed_dim
    q = spec.num_heads * a.head_dim
    kv = spec.kv_heads * a.head_dim
    attn_mm = 2 * h * q + 2 * h * kv  # q and o, k and v
    mlp_mm = (3 if a.gated_mlp else 2) * h * f
    matmul = attn_mm + mlp_mm
    norms = a.norms_per_block * a.norm_params * h + (2 * a.head_dim if a.qk_norm else 0)
    biases = ((q + 2 * kv) if a.qkv_bias else 0) + (h if a.out_bias else 0)
    if a.mlp_bias:
        biases += (2 * f if a.gated_mlp else f) + h
    block = matmul + norms + biases
    project = 0 if e == h else e * h  # OPT's project_in (first stage) and project_out (last stage)
    embed = V * e + a.position_rows * h + project
    head = (a.norm_params * h if a.final_norm else 0) + project + (0 if spec.tie_embeddings else V * e)
    attn_core = 4 * s * q
    mlp_act = 2 * h + (8 * f if a.gated_mlp else 4 * f) + h
    none = 4 * h + 7 * h + 4 * kv + mlp_act
    return ModelCosts(
        spec=spec, seq_len=s, block_params=block, block_matmul_params=matmul, embed_params=embed,
        head_params=head, block_fwd_flops_per_token=2 * matmul + attn_core,
        head_fwd_flops_per_token=2 * e * V + 2 * project, attn_core_fwd_flops_per_token=attn_core,
        act_bytes_per_token={"none": none, "selective": (none + 2 * h) / 2, "full": 2 * h},
    )
