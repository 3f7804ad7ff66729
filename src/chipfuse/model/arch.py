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
