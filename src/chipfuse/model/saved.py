"""What a transformers-built stage saves for backward, read from its family's row (SavedCoeffs).

plan.memory's per-architecture activation model: a block's saved values per token as coefficients of
the model's widths (model.arch.Saved), changed by what the config changes (dropout, sliding windows,
eager attention). Pure; each architecture's numbers live in its row (model/families/).
"""

from __future__ import annotations

from typing import Any

from chipfuse.model.arch import ACT_SAVES, SDPA, Saved, SavedCoeffs
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec


def row_of(spec: ModelSpec) -> SavedCoeffs:
    """The spec's activation row; a family without one (the built-in GPT) is priced by plan.memory's formula."""
    fam = family_of(spec)
    if fam.saved is None:
        raise ValueError(f"{fam.label} has no activation row (plan.memory prices it by its block formula)")
    return fam.saved


def _cfg(spec: ModelSpec, key: str, default: Any = None) -> Any:
    return (spec.hf_config or {}).get(key, default)


def dropout_rates(spec: ModelSpec) -> dict[str, float]:
    """The config's dropout rates by where they act: 'resid' (after attention and after the MLP),
    'embed' (after the first stage's embedding), 'attn' (on attention probabilities); the row's
    SavedCoeffs.dropout names their config keys."""
    return {where: _cfg(spec, key, 0.0) or 0.0 for where, key in row_of(spec).dropout.items()}


def rotary_sets(spec: ModelSpec, layers: range) -> int:
    """Sets of rotary cos/sin a stage of these layers computes, 0 without rotary: HFStage computes them
    once per layer type of the stage (Gemma 3's local and global frequencies differ; the others'
    are equal but computed again), once where the masks do not go by layer type."""
    if not row_of(spec).rotary:
        return 0
    types = _cfg(spec, "layer_types")
    lay = family_of(spec).layout
    if lay is not None and lay.masks == "by_layer_type" and types:
        return len({types[i] for i in layers if i < len(types)}) or 1
    return 1


def masked_window(spec: ModelSpec, layer: int, seq_len: int) -> bool:
    """Whether layer `layer` attends through a sliding window shorter than the sequence: transformers
    then gives SDPA a mask (kept, seq_len per token) instead of is_causal."""
    window = _cfg(spec, "sliding_window")
    if not window or seq_len <= window:
        return False
    lay = family_of(spec).layout
    if lay is None:
        return False
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
    its number in the whole model). In fp32 everything is the second part; in bf16 (autocast) the row's
    `bf16` row splits them (an architecture without one keeps `block` whole in fp32: an over-count).

    Starts from the row's fused-SDPA block and changes what the config changes:
    - a sliding window shorter than the sequence: SDPA gets a float mask (seq_len) and k, v repeated to
      every query head (q each, instead of kv each);
    - attention dropout while training: SDPA on CPU leaves the fused kernel for its math path, which
      keeps q and k scaled copies (q, kv), v, the probabilities, the dropout mask and the dropped
      probabilities (3 x heads x seq_len), and o_proj/c_proj reads a copy of the output (q); in bf16 the
      math path runs in fp32 (all of that fp32 but the output's bf16 copy);
    - eager attention (Gemma 2): scaled q (q), k and v repeated (q each), tanh of the soft-capped
      scores and the softmax (2 x heads x seq_len; 1 without soft-capping), o_proj's input copy (q);
      in bf16 the softmax is fp32 and its bf16 cast (the matmul's input) is kept too;
    - dropout masks while training: CPU's dropout keeps its mask in the compute dtype (a value per
      element; CUDA's fused dropout keeps one byte): one h per residual dropout site (two per layer);
    - an activation read from the config (GPT-2): ACT_SAVES (gelu_new's Python ops keep four ffn besides the output).
    A (1 + weight) norm's weight (Gemma) is fp32 whatever the compute dtype.
    """
    row = row_of(spec)
    if dtype != "bf16":
        wide, b = Saved(), row.block
    elif row.bf16 is None:
        wide, b = row.block, Saved()
    else:
        wide, b = row.bf16
    drop = dropout_rates(spec) if training else {}
    masked = masked_window(spec, layer, seq_len)
    if row.eager_attention:
        soft = 2 if _cfg(spec, "attn_logit_softcapping") else 1
        if dtype == "bf16" and row.bf16 is not None:
            wide = wide + Saved(heads=-1, scores=1)
            b = b + Saved(q=2, kv=-2, scores=soft)
        else:
            b = b + SDPA.times(-1) + Saved(q=4, scores=soft)
    elif drop.get("attn", 0.0) > 0 and dtype == "bf16" and row.bf16 is not None:
        # The math path computes in fp32 (CPU): fp32 copies of scaled q, k and v, the probabilities, the
        # mask and the dropped probabilities; o_proj/c_proj keeps a bf16 copy of the output (q).
        wide = wide + Saved(heads=-1, q=1, kv=2, scores=3)
        b = b + Saved(q=-1, kv=-2)
    elif drop.get("attn", 0.0) > 0:
        fused = Saved(q=row.qkv_storage + 1, kv=2 * row.qkv_storage, heads=1) if row.qkv_storage else SDPA
        v = Saved(q=row.qkv_storage, kv=2 * row.qkv_storage) if row.qkv_storage else Saved(kv=1)
        b = b + fused.times(-1) + Saved(q=2, kv=1, scores=3) + v
    elif masked:
        b = b + Saved(kv=-2, q=2, mask=1)
    if row.activation_saves:
        act = str(_cfg(spec, "activation_function", "gelu_new"))
        b = b + Saved(ffn=ACT_SAVES.get(act, 4) - 4)
    if drop.get("resid", 0.0) > 0:
        b = b + Saved(h=2)
    if row.norm_plus_one:
        norms = spec.arch().norms_per_block
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
    mlp = 3 if a.gated_mlp else 2
    return spec.dim * (2 * q + 2 * kv) + mlp * spec.dim * spec.ffn
