"""The vocabulary of architecture rows: where a transformers model's pieces live (Layout) and what
one of its blocks saves for backward (Saved, SavedCoeffs), with the building blocks the rows add up.

Pure data, no torch and nothing else of chipfuse's model package: the rows themselves are declared
by each family (model/families/), the functions that read them for a spec live in model/saved.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["rotary", "gpt2", "opt"]


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the pieces of one architecture live, by the full model's module names."""

    kind: Kind
    """How a stage runs its pieces: 'rotary' (Llama-like: embeddings, rotary positions recomputed
    on every stage, decoder layers, norm, head), 'gpt2' (learned positions added on the first
    stage), 'opt' (learned positions with an offset, optional project_in / project_out)."""
    embed: str
    layers: str
    first: tuple[str, ...] = ()
    """Modules the first stage runs after the token embedding (positions, input projection)."""
    last: tuple[str, ...] = ()
    """Modules the last stage runs before the head (final norm, output projection)."""
    head: str = "lm_head"
    masks: Literal["causal", "window", "by_layer_type"] = "causal"
    """Attention masks as the architecture's forward makes them: causal for every layer, a
    sliding window for every layer when the config sets sliding_window (Mistral, Phi-3), or one
    per config.layer_types entry (Qwen2/3, Gemma 2/3)."""
    tp: Mapping[str, str] | None = None
    """Tensor-parallel plan (runtime/parallel/tp.py) by module name inside one decoder layer:
    'colwise' or 'rowwise'. None: tensor parallel is not run for this architecture (`no_tp` says why)."""
    no_tp: str = ""

    @property
    def rotary(self) -> str | None:
        """The parameter-free rotary module beside the layers ('rotary' kind): every stage keeps its own."""
        return self.layers.rpartition(".")[0] + ".rotary_emb" if self.kind == "rotary" else None


# Megatron's split by transformers' own names: q, k, v, gate, up by output columns, o and down by
# input rows. These attentions infer their head count from the projection's width
# (view(..., -1, head_dim)), so each member runs its own heads with the module unchanged.
ROTARY_TP: Mapping[str, str] = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise"}


LLAMA_LIKE = Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                    tp=ROTARY_TP)
WINDOW = Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                masks="window", tp=ROTARY_TP)
BY_LAYER_TYPE = Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                       masks="by_layer_type", tp=ROTARY_TP)


# ------------------------------------------------------------------------------ saved activations
@dataclass(frozen=True, kw_only=True)
class Saved:
    """Values autograd keeps for backward, per token, as coefficients of the model's widths:
    `h` x hidden size, `ffn` x intermediate size, `q` x heads * head_dim, `kv` x kv_heads * head_dim,
    `heads` / `kv_heads` x head counts (log-sum-exp, per-head norm statistics), `scalars` per token
    (norm statistics), `scores` x heads * seq_len (attention probabilities an eager or math attention
    keeps), `mask` x seq_len (a float attention mask), `per_sequence` values kept once per micro-batch
    rather than per token (Gemma's norm weight, 1 + weight): shared by the micro-batch's sequences
    (plan.memory.saved_values' `sequences`)."""

    h: float = 0.0
    ffn: float = 0.0
    q: float = 0.0
    kv: float = 0.0
    heads: float = 0.0
    kv_heads: float = 0.0
    scalars: float = 0.0
    scores: float = 0.0
    mask: float = 0.0
    per_sequence: float = 0.0

    def __add__(self, o: Saved) -> Saved:
        return Saved(**{k: getattr(self, k) + getattr(o, k) for k in self.__dataclass_fields__})

    def times(self, n: float) -> Saved:
        return Saved(**{k: n * getattr(self, k) for k in self.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class SavedCoeffs:
    """What one decoder layer of an architecture saves for backward, in transformers' own code
    (read in transformers/models/<type>/modeling_<type>.py, sdpa_attention.py, activations.py) and
    measured by tests/test_memory_hf.py. Widths in `Saved`'s terms."""

    block: Saved
    """A layer with torch's fused SDPA (flash kernel: q, k, v, output and one log-sum-exp per head),
    no float mask, no dropout."""
    rotary: bool = True
    """cos and sin (2 x head_dim per position), computed once per stage and saved by q * cos."""
    qkv_storage: float = 0.0
    """Fused q/k/v projection (GPT-2's c_attn, Phi-3's qkv_proj): v is a view of the whole output,
    so the saved v holds q + 2 kv values (already in `block`); the math path keeps it too."""
    bf16: tuple[Saved, Saved] | None = None
    """`block` under bf16 autocast (fp32 master weights), as (values kept in fp32, values kept in bf16);
    None where it is not measured (saved_block_parts then keeps `block`, every value in fp32). The rule
    (tests/test_memory_hf.py measures it): the residual stream stays fp32 (the embedding and the
    stage input are fp32, and fp32 + bf16 is fp32), so a norm's input, its statistics and its
    normalised product are fp32, and so are softmax / log-softmax outputs (autocast runs them in fp32),
    SDPA's log-sum-exp, rotary cos/sin and Gemma's (1 + weight); every linear saves its own bf16 cast
    of a fp32 input (q, k and v each: three h after a norm where fp32 saves one) and of its weight
    (saved_weight_values, per micro-batch); what a linear or SDPA outputs, and what is computed from it,
    is bf16."""
    dropout: Mapping[str, str] = field(default_factory=lambda: {"attn": "attention_dropout"})
    """Config keys of the dropout rates by where they act: 'resid' (after attention and after the MLP),
    'embed' (after the first stage's embedding), 'attn' (on attention probabilities)."""
    eager_attention: bool = False
    """Attention runs transformers' eager path (Gemma 2's default): scaled q, k and v repeated, the
    (soft-capped) scores and the softmax kept instead of the fused kernel's row."""
    activation_saves: bool = False
    """The MLP's activation is read whole from config.activation_function (ACT_SAVES; GPT-2)."""
    norm_plus_one: bool = False
    """Norms scale by (1 + weight), a tensor each norm keeps per micro-batch (Gemma)."""
    embed_scale: bool = False
    """The embedding multiplies by a scalar tensor per micro-batch (Gemma's sqrt(hidden_size))."""
    position_ids: bool = False
    """The first stage keeps learned positions' ids (GPT-2, OPT)."""
    project_io: bool = False
    """OPT's project_in / project_out around a narrower embedding, and its optional final norm."""


# Norms. RMSNorm (Llama-like): x (h), rsqrt (1 scalar), x * rsqrt (h, saved by weight * .); the
# linear after a pre-norm saves its output (h). Gemma's norm multiplies by (1 + weight): that
# (h,) tensor is saved per norm (a per-sequence term). LayerNorm: x (h), mean and rstd (2 scalars);
# the next linear saves its output (h).
RMS_PRE = Saved(h=3, scalars=1)
RMS_POST = Saved(h=2, scalars=1)
LN_PRE = Saved(h=2, scalars=2)
# Fused SDPA with grouped-query attention (enable_gqa): q after rotary (q), k after rotary (kv), v (kv,
# a transposed view of v_proj's output), one log-sum-exp per head, the output (q), which o_proj reads
# as a view (no second copy).
SDPA = Saved(q=2, kv=2, heads=1)
# SwiGLU / GeGLU: gate output (act's input), up output, act output, their product (down_proj's input).
GLU = Saved(ffn=4)
QK_NORM = Saved(q=2, heads=1, kv=2, kv_heads=1)  # RMSNorm over head_dim on q and on k

LLAMA = RMS_PRE + SDPA + RMS_PRE + GLU
# Under bf16 autocast (SavedCoeffs.bf16): per norm x, rsqrt and x * rsqrt in fp32, one bf16 input copy
# per linear reading the norm (q, k, v: 3; gate, up: 2); SDPA's log-sum-exp in fp32, its q, k, v and
# output in bf16; the MLP in bf16.
LLAMA_BF16 = (Saved(h=4, scalars=2, heads=1), Saved(h=5, q=2, kv=2, ffn=4))
GEMMA2_NORMS = RMS_PRE + RMS_POST + RMS_PRE + RMS_POST  # pre/post attention, pre/post MLP

ACT_SAVES = {"gelu_new": 4, "gelu_fast": 4, "gelu": 1, "gelu_pytorch_tanh": 1, "quick_gelu": 2, "relu": 0,
             "silu": 1}
"""Values per ffn unit an activation keeps besides its output (GPT-2's MLP, which reads it whole)."""
