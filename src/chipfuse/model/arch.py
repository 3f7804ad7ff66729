"""Which Hugging Face architectures chipfuse splits into stages, and how their configs read.

One row per model_type: where its pieces live in transformers' module tree (the stage split,
model/hf.py) and what its parameter count depends on (read from the config into ModelSpec's
architecture fields, priced by model/costs.py). The config goes through transformers' AutoConfig,
so that every field transformers fills by default is the value the model is built with.

An architecture that is not in the table is refused with the reason: its pieces and forward
differ from these in ways a stage could get silently wrong (cross-attention, encoder-decoder,
mixture of experts, bidirectional attention...), and a look-alike would train another model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from chipfuse.errors import ChipfuseError

if TYPE_CHECKING:
    from chipfuse.model.spec import ModelSpec

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
_WINDOW = Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                 masks="window", tp=ROTARY_TP)
_BY_TYPE = Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                  masks="by_layer_type", tp=ROTARY_TP)
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LIKE, "gemma": LLAMA_LIKE, "mistral": _WINDOW,
    "phi3": Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                   masks="window", no_tp="its fused qkv_proj is cut into q, k and v at the whole model's head "
                   "counts (config.num_attention_heads), which a member holding some heads does not have"),
    **{t: _BY_TYPE for t in ("qwen2", "qwen3", "gemma2", "gemma3_text")},
    "gpt2": Layout(kind="gpt2", embed="transformer.wte", layers="transformer.h", first=("transformer.wpe",),
                   last=("transformer.ln_f",),
                   no_tp="its attention and MLP are Conv1D modules (transposed weights, a fused c_attn split at "
                   "the whole width), which DTensor's colwise/rowwise plans do not split"),
    "opt": Layout(kind="opt", embed="model.decoder.embed_tokens", layers="model.decoder.layers",
                  first=("model.decoder.embed_positions", "model.decoder.project_in"),
                  last=("model.decoder.final_layer_norm", "model.decoder.project_out"),
                  no_tp="its attention reshapes q, k and v by the whole model's head count (self.num_heads), so "
                  "a member's heads would be read as a shorter sequence"),
}


def layout_of(spec: ModelSpec) -> Layout:
    """The layout of a Hugging Face spec: a 'llama' preset is a Llama, an 'hf' spec its model_type."""
    return LLAMA_LIKE if spec.family == "llama" else LAYOUTS[str(spec.model_type)]


def tp_refusal(spec: ModelSpec) -> str | None:
    """Why a tensor-parallel stage of this model is not run; None when it is (the built-in GPT's
    plan lives beside its fused-qkv split in runtime/parallel/tp.py)."""
    if spec.family == "gpt":
        return None
    lay = layout_of(spec)
    if lay.tp is None:
        return f"model_type {spec.model_type!r}: {lay.no_tp}"
    if spec.arch().qk_norm:
        # The norm runs on each member's own heads, so its weight's gradient is a partial sum that
        # DTensor's colwise/rowwise plan never adds up over the group.
        return (f"model_type {spec.model_type!r}: its q/k norms (one weight over head_dim shared by all "
                "heads) would get only a member's heads' gradient")
    return None


def _rotary_fields(c: Any, mt: str) -> dict[str, Any]:
    attn_bias = bool(getattr(c, "attention_bias", False))
    return {"norm": "rmsnorm", "qkv_bias": attn_bias or mt == "qwen2", "out_bias": attn_bias,
            "mlp_bias": bool(getattr(c, "mlp_bias", False)), "gated_mlp": True, "position_rows": 0,
            "qk_norm": mt in ("qwen3", "gemma3_text"),
            "norms_per_block": 4 if mt in ("gemma2", "gemma3_text") else 2, "embed_dim": c.hidden_size,
            "final_norm": True, "ffn_dim": c.intermediate_size,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "seq_len": c.max_position_embeddings}


def _gpt2_fields(c: Any) -> dict[str, Any]:
    return {"norm": "layernorm", "qkv_bias": True, "out_bias": True, "mlp_bias": True, "gated_mlp": False,
            "position_rows": c.n_positions, "qk_norm": False, "norms_per_block": 2, "embed_dim": c.n_embd,
            "final_norm": True, "ffn_dim": c.n_inner or 4 * c.n_embd, "head_dim": c.n_embd // c.n_head,
            "seq_len": c.n_positions}


def _opt_fields(c: Any, source: str) -> dict[str, Any]:
    if not c.layer_norm_elementwise_affine:
        raise ChipfuseError(f"{source}: layer_norm_elementwise_affine: false is not priced by chipfuse's cost "
                            "model. Fix: use an OPT config with affine layer norms")
    bias = bool(c.enable_bias)
    return {"norm": "layernorm", "qkv_bias": bias, "out_bias": bias, "mlp_bias": bias, "gated_mlp": False,
            "position_rows": c.max_position_embeddings + 2,  # OPT's learned positions start at offset 2
            "qk_norm": False, "norms_per_block": 2, "embed_dim": c.word_embed_proj_dim,
            "final_norm": bool(c.do_layer_norm_before and not c._remove_final_layer_norm),
            "ffn_dim": c.ffn_dim, "head_dim": c.hidden_size // c.num_attention_heads,
            "seq_len": c.max_position_embeddings}


def _refuse_unsupported(c: Any, mt: str, source: str) -> None:
    if getattr(c, "is_encoder_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ChipfuseError(f"{source}: model_type {mt!r} has cross-attention; chipfuse splits decoder-only "
                            "models. Fix: use a decoder-only architecture")
    if getattr(c, "use_bidirectional_attention", False):
        raise ChipfuseError(f"{source}: use_bidirectional_attention: true is not a causal language model. "
                            "Fix: set it to false")


def hf_config_class_dict(raw: dict[str, Any], source: str) -> Any:
    """transformers' config object for a config.json's dict (AutoConfig, so defaults match)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ChipfuseError(f"{source}: reading a Hugging Face config needs transformers. "
                            "Fix: pip install 'chipfuse[hf]'") from None
    mt = raw.get("model_type")
    if not mt:
        raise ChipfuseError(f"{source}: field 'model_type' missing. Fix: a Hugging Face config.json names its "
                            f"architecture (one of {sorted(LAYOUTS)})")
    rest = {k: v for k, v in raw.items() if k != "model_type"}
    if mt not in LAYOUTS:
        raise ChipfuseError(f"{source}: model_type {mt!r}: chipfuse has no stage split for it. "
                            f"Fix: use one of {sorted(LAYOUTS)}")
    try:
        return AutoConfig.for_model(mt, **rest)
    except Exception as e:  # transformers' own field checks raise several types; one line for all
        found = " ".join(str(e).split())
        raise ChipfuseError(f"{source}: transformers refuses this {mt} config ({found[:300]}). "
                            "Fix: correct that field (or write the config with transformers' save_pretrained)") from None


def spec_from_config_dict(raw: dict[str, Any], *, name: str, source: str) -> Any:
    """A ModelSpec (family 'hf') from a config.json's dict; refused when chipfuse cannot split it."""
    from chipfuse.model.spec import ModelSpec

    mt = raw.get("model_type")
    if not isinstance(mt, str) or mt not in LAYOUTS:
        raise ChipfuseError(f"{source}: model_type {mt!r}: chipfuse has no stage split for this architecture "
                            f"(it splits {', '.join(sorted(LAYOUTS))}). Fix: use a config of one of these; "
                            "chipfuse does not train a look-alike of another architecture")
    c = hf_config_class_dict(raw, source)
    # transformers would fill a missing shape field with its default (a 32-layer Llama from a
    # config without num_hidden_layers): a shape is what the user means to train, so it must be there.
    aliases = getattr(c, "attribute_map", {}) or {}
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if key not in raw and aliases.get(key, key) not in raw:
            raise ChipfuseError(f"{source}: field {key!r} missing. Fix: a decoder-only config needs it "
                                "(write the config with transformers' save_pretrained)")
    _refuse_unsupported(c, mt, source)
    if LAYOUTS[mt].kind == "gpt2":
        shape = _gpt2_fields(c)
    elif LAYOUTS[mt].kind == "opt":
        shape = _opt_fields(c, source)
    else:
        shape = _rotary_fields(c, mt)
    return ModelSpec(name=name, family="hf", model_type=mt, hf_config=c.to_dict(),
                     num_layers=c.num_hidden_layers, dim=c.hidden_size, num_heads=c.num_attention_heads,
                     num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                     vocab_size=c.vocab_size, tie_embeddings=bool(c.tie_word_embeddings), **shape)


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


# Norms. RMSNorm (Llama-like): x (h), rsqrt (1 scalar), x * rsqrt (h, saved by weight * .); the
# linear after a pre-norm saves its output (h). Gemma's norm multiplies by (1 + weight): that
# (h,) tensor is saved per norm (a per-sequence term). LayerNorm: x (h), mean and rstd (2 scalars);
# the next linear saves its output (h).
_RMS_PRE = Saved(h=3, scalars=1)
_RMS_POST = Saved(h=2, scalars=1)
_LN_PRE = Saved(h=2, scalars=2)
# Fused SDPA with grouped-query attention (enable_gqa): q after rotary (q), k after rotary (kv), v (kv,
# a transposed view of v_proj's output), one log-sum-exp per head, the output (q), which o_proj reads
# as a view (no second copy).
_SDPA = Saved(q=2, kv=2, heads=1)
# SwiGLU / GeGLU: gate output (act's input), up output, act output, their product (down_proj's input).
_GLU = Saved(ffn=4)
_QK_NORM = Saved(q=2, heads=1, kv=2, kv_heads=1)  # RMSNorm over head_dim on q and on k

_LLAMA = _RMS_PRE + _SDPA + _RMS_PRE + _GLU
# Under bf16 autocast (SavedCoeffs.bf16): per norm x, rsqrt and x * rsqrt in fp32, one bf16 input copy
# per linear reading the norm (q, k, v: 3; gate, up: 2); SDPA's log-sum-exp in fp32, its q, k, v and
# output in bf16; the MLP in bf16.
_LLAMA_BF16 = (Saved(h=4, scalars=2, heads=1), Saved(h=5, q=2, kv=2, ffn=4))
_GEMMA2_NORMS = _RMS_PRE + _RMS_POST + _RMS_PRE + _RMS_POST  # pre/post attention, pre/post MLP

SAVED: dict[str, SavedCoeffs] = {
    "llama": SavedCoeffs(block=_LLAMA, bf16=_LLAMA_BF16), "mistral": SavedCoeffs(block=_LLAMA, bf16=_LLAMA_BF16),
    "qwen2": SavedCoeffs(block=_LLAMA, bf16=_LLAMA_BF16),
    # In bf16 the q/k norm's input is a fp32 copy (q, kv) and its normalised product is cast back to
    # bf16 before the weight multiplies it (kept: q, kv).
    "qwen3": SavedCoeffs(block=_LLAMA + _QK_NORM, bf16=(_LLAMA_BF16[0] + Saved(q=1, heads=1, kv=1, kv_heads=1),
                                                        _LLAMA_BF16[1] + Saved(q=1, kv=1))),
    "gemma": SavedCoeffs(block=_LLAMA, bf16=_LLAMA_BF16),
    # Gemma 2 trains with eager attention (transformers' default for it): see saved_block. In bf16 its
    # four norms keep x, rsqrt and the product in fp32; the fused-SDPA row is changed in saved_block.
    "gemma2": SavedCoeffs(block=_GEMMA2_NORMS + _SDPA + _GLU,
                          bf16=(Saved(h=8, scalars=4, heads=1), Saved(h=5, q=2, kv=2, ffn=4))),
    # In bf16 Gemma's q/k norm computes in fp32 throughout (its input copy and product: fp32).
    "gemma3_text": SavedCoeffs(block=_GEMMA2_NORMS + _QK_NORM + _SDPA + _GLU,
                               bf16=(Saved(h=8, scalars=4, heads=1) + _QK_NORM, Saved(h=5, q=2, kv=2, ffn=4))),
    # Phi-3: fused qkv_proj (v is a view of its q + 2 kv output), o_proj reads a reshaped copy of
    # the attention output (q), fused gate_up_proj (2 ffn) + silu output + product.
    # In bf16: one linear after each norm (one bf16 input copy each).
    "phi3": SavedCoeffs(block=_RMS_PRE + Saved(q=4, kv=3, heads=1) + _RMS_PRE + _GLU, qkv_storage=1,
                        bf16=(Saved(h=4, scalars=2, heads=1), Saved(h=2, q=4, kv=3, ffn=4))),
    # GPT-2: c_attn's one output holds q, k and v (q + 2 kv), log-sum-exp, output (read by c_proj as a
    # view); gelu_new written as Python ops keeps its input, tanh output, 1 + tanh and 0.5 * x, and
    # c_proj keeps its output (5 ffn).
    # In bf16: LayerNorm's x, mean and rstd in fp32, c_attn's and c_fc's bf16 input copies.
    "gpt2": SavedCoeffs(block=_LN_PRE + Saved(q=2, kv=2, heads=1) + _LN_PRE + Saved(ffn=5), rotary=False,
                        qkv_storage=1, bf16=(Saved(h=2, scalars=4, heads=1), Saved(h=2, q=2, kv=2, ffn=5))),
    # OPT: q is scaled into a copy (q), k and v are views of their projections (kv each), output (q);
    # fc1's input (h), ReLU's output (ffn), which fc2 reads (the same tensor).
    # In bf16: q, k and v each keep a bf16 copy of the norm output (3 h), fc1 one (h).
    "opt": SavedCoeffs(block=_LN_PRE + _SDPA + _LN_PRE + Saved(ffn=1), rotary=False,
                       bf16=(Saved(h=2, scalars=4, heads=1), Saved(h=4, q=2, kv=2, ffn=1))),
}
ACT_SAVES = {"gelu_new": 4, "gelu_fast": 4, "gelu": 1, "gelu_pytorch_tanh": 1, "quick_gelu": 2, "relu": 0,
             "silu": 1}
"""Values per ffn unit an activation keeps besides its output (GPT-2's MLP, which reads it whole)."""


def saved_type(spec: ModelSpec) -> str:
    """The SAVED row of a spec: its model_type, 'llama' for a Llama preset (built as LlamaForCausalLM)."""
    return "llama" if spec.family == "llama" else str(spec.model_type)


def _cfg(spec: ModelSpec, key: str, default: Any = None) -> Any:
    return (spec.hf_config or {}).get(key, default)


def dropout_rates(spec: ModelSpec) -> dict[str, float]:
    """The config's dropout rates by where they act: 'resid' (after attention and after the MLP),
    'embed' (after the first stage's embedding), 'attn' (on attention probabilities)."""
    mt = spec.model_type
    if mt == "gpt2":
        return {"resid": _cfg(spec, "resid_pdrop", 0.0), "embed": _cfg(spec, "embd_pdrop", 0.0),
                "attn": _cfg(spec, "attn_pdrop", 0.0)}
    if mt == "opt":
        # activation_dropout is a config field OPT's layer never applies.
        return {"resid": _cfg(spec, "dropout", 0.0), "attn": _cfg(spec, "attention_dropout", 0.0)}
    out = {"attn": _cfg(spec, "attention_dropout", 0.0) or 0.0}
    if mt == "phi3":
        out["resid"] = _cfg(spec, "resid_pdrop", 0.0) or 0.0  # resid_attn_dropout, resid_mlp_dropout
    return out


def rotary_sets(spec: ModelSpec, layers: range) -> int:
    """Sets of rotary cos/sin a stage of these layers computes, 0 without rotary: HFStage computes them
    once per layer type of the stage (Gemma 3's local and global frequencies differ; the others'
    are equal but computed again), once where the masks do not go by layer type."""
    if not SAVED[saved_type(spec)].rotary:
        return 0
    types = _cfg(spec, "layer_types")
    if layout_of(spec).masks == "by_layer_type" and types:
        return len({types[i] for i in layers if i < len(types)}) or 1
    return 1


def masked_window(spec: ModelSpec, layer: int, seq_len: int) -> bool:
    """Whether layer `layer` attends through a sliding window shorter than the sequence: transformers
    then gives SDPA a mask (kept, seq_len per token) instead of is_causal."""
    window = _cfg(spec, "sliding_window")
    if not window or seq_len <= window:
        return False
    lay = layout_of(spec)
    if lay.masks == "window":
        return True
    if lay.masks == "by_layer_type":
        types = _cfg(spec, "layer_types") or []
        return layer < len(types) and types[layer] == "sliding_attention"
    return False


def saved_block(spec: ModelSpec, layer: int, seq_len: int, *, training: bool = True) -> Saved:
    """Values one decoder layer (`layer`, its number in the whole model) keeps for backward per token,
    in fp32: saved_block_parts's compute-dtype part."""
    return saved_block_parts(spec, layer, seq_len, dtype="fp32", training=training)[1]


def saved_block_parts(spec: ModelSpec, layer: int, seq_len: int, *, dtype: str,
                      training: bool = True) -> tuple[Saved, Saved]:
    """(values kept in fp32, values kept in the compute dtype) per token of one decoder layer (`layer`,
    its number in the whole model). In fp32 everything is the second part; in bf16 (autocast) SAVED's
    `bf16` row splits them (an architecture without one keeps `block` whole in fp32: an over-count).

    Starts from SAVED's fused-SDPA row and changes what the config changes:
    - a sliding window shorter than the sequence: SDPA gets a float mask (seq_len) and k, v repeated to
      every query head (q each, instead of kv each);
    - attention dropout while training: SDPA on CPU leaves the fused kernel for its math path, which
      keeps q and k scaled copies (q, kv), v, the probabilities, the dropout mask and the dropped
      probabilities (3 x heads x seq_len), and o_proj/c_proj reads a copy of the output (q); in bf16 the
      math path runs in fp32 (all of that fp32 but the output's bf16 copy);
    - Gemma 2's eager attention: scaled q (q), k and v repeated (q each), tanh of the soft-capped
      scores and the softmax (2 x heads x seq_len; 1 without soft-capping), o_proj's input copy (q);
      in bf16 the softmax is fp32 and its bf16 cast (the matmul's input) is kept too;
    - dropout masks while training: CPU's dropout keeps its mask in the compute dtype (a value per
      element; CUDA's fused dropout keeps one byte): one h per residual dropout site (two per layer);
    - GPT-2's activation: ACT_SAVES (gelu_new's Python ops keep four ffn besides the output).
    Gemma's (1 + weight) per norm is fp32 whatever the compute dtype.
    """
    mt = saved_type(spec)
    row = SAVED[mt]
    if dtype != "bf16":
        wide, b = Saved(), row.block
    elif row.bf16 is None:
        wide, b = row.block, Saved()
    else:
        wide, b = row.bf16
    drop = dropout_rates(spec) if training else {}
    masked = masked_window(spec, layer, seq_len)
    if mt == "gemma2":
        soft = 2 if _cfg(spec, "attn_logit_softcapping") else 1
        if dtype == "bf16" and row.bf16 is not None:
            wide = wide + Saved(heads=-1, scores=1)
            b = b + Saved(q=2, kv=-2, scores=soft)
        else:
            b = b + _SDPA.times(-1) + Saved(q=4, scores=soft)
    elif drop.get("attn", 0.0) > 0 and dtype == "bf16" and row.bf16 is not None:
        # The math path computes in fp32 (CPU): fp32 copies of scaled q, k and v, the probabilities, the
        # mask and the dropped probabilities; o_proj/c_proj keeps a bf16 copy of the output (q).
        wide = wide + Saved(heads=-1, q=1, kv=2, scores=3)
        b = b + Saved(q=-1, kv=-2)
    elif drop.get("attn", 0.0) > 0:
        fused = Saved(q=row.qkv_storage + 1, kv=2 * row.qkv_storage, heads=1) if row.qkv_storage else _SDPA
        v = Saved(q=row.qkv_storage, kv=2 * row.qkv_storage) if row.qkv_storage else Saved(kv=1)
        b = b + fused.times(-1) + Saved(q=2, kv=1, scores=3) + v
    elif masked:
        b = b + Saved(kv=-2, q=2, mask=1)
    if mt == "gpt2":
        act = str(_cfg(spec, "activation_function", "gelu_new"))
        b = b + Saved(ffn=ACT_SAVES.get(act, 4) - 4)
    if drop.get("resid", 0.0) > 0:
        b = b + Saved(h=2)
    if mt in ("gemma", "gemma2", "gemma3_text"):
        norms = 2 if mt == "gemma" else 4
        weights = Saved(per_sequence=norms * spec.dim + (2 * spec.arch().head_dim if spec.arch().qk_norm else 0))
        if dtype == "bf16":
            wide = wide + weights
        else:
            b = b + weights
    return wide, b


def linear_weight_values(spec: ModelSpec) -> int:
    """Values of one decoder layer's matmul weights (q, k, v, o and the MLP's two or three): under bf16
    autocast each linear saves the bf16 cast of its fp32 weight, once per micro-batch (autocast's cast
    cache lives for one forward), so a stage holds a bf16 copy per micro-batch in flight."""
    a = spec.arch()
    q, kv = spec.num_heads * a.head_dim, spec.kv_heads * a.head_dim
    mlp = 2 if spec.model_type in ("gpt2", "opt") else 3
    return spec.dim * (2 * q + 2 * kv) + mlp * spec.dim * spec.ffn
