"""The Hugging Face architectures chipfuse splits into stages: one row per model_type.

A row says where the architecture's pieces live in transformers' module tree (Layout, the stage
split of model/hf.py), how its config reads into ModelSpec's fields (the parameter count then
equals transformers', tests/test_hf_arch.py), what one of its blocks saves for backward
(SavedCoeffs, read in transformers' modeling_<type>.py and measured by tests/test_memory_hf.py) and
why tensor parallelism is not run where it is not. The config itself is transformers' (AutoConfig),
so every field transformers fills by default is the value the model is built with.

An architecture that has no row is refused with the reason: its pieces and forward differ from
these in ways a stage could get silently wrong (cross-attention, encoder-decoder, mixture of
experts, bidirectional attention...), and a look-alike would train another model.
Adding one: its row below (and its tiny config in the tests), nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chipfuse.errors import ChipfuseError
from chipfuse.model.arch import (
    BY_LAYER_TYPE,
    GEMMA2_NORMS,
    GLU,
    LLAMA,
    LLAMA_BF16,
    LLAMA_LIKE,
    LN_PRE,
    QK_NORM,
    RMS_PRE,
    SDPA,
    WINDOW,
    Layout,
    Saved,
    SavedCoeffs,
)
from chipfuse.model.families.gpt import gpt_numels
from chipfuse.model.families.llama import LLAMA_SAVED, llama_arch, llama_ffn
from chipfuse.model.family import Family, Spec

FieldReader = Callable[[Any, str], dict[str, Any]]


def rotary_fields(*, qkv_bias: bool = False, qk_norm: bool = False, norms_per_block: int = 2) -> FieldReader:
    """A Llama-like config's fields; `qkv_bias`: q/k/v biases whatever attention_bias says (Qwen2),
    `qk_norm`: a norm over head_dim on q and k (Qwen3, Gemma 3), `norms_per_block`: 4 with norms
    after attention and MLP too (Gemma 2 / 3)."""

    def read(c: Any, source: str) -> dict[str, Any]:
        attn_bias = bool(getattr(c, "attention_bias", False))
        return {"norm": "rmsnorm", "qkv_bias": attn_bias or qkv_bias, "out_bias": attn_bias,
                "mlp_bias": bool(getattr(c, "mlp_bias", False)), "gated_mlp": True, "position_rows": 0,
                "qk_norm": qk_norm, "norms_per_block": norms_per_block, "embed_dim": c.hidden_size,
                "final_norm": True, "ffn_dim": c.intermediate_size,
                "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                "seq_len": c.max_position_embeddings}

    return read


def gpt2_fields(c: Any, source: str) -> dict[str, Any]:
    return {"norm": "layernorm", "qkv_bias": True, "out_bias": True, "mlp_bias": True, "gated_mlp": False,
            "position_rows": c.n_positions, "qk_norm": False, "norms_per_block": 2, "embed_dim": c.n_embd,
            "final_norm": True, "ffn_dim": c.n_inner or 4 * c.n_embd, "head_dim": c.n_embd // c.n_head,
            "seq_len": c.n_positions}


def opt_fields(c: Any, source: str) -> dict[str, Any]:
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


def own_config(spec: Spec) -> dict[str, Any]:
    """The spec's own Hugging Face config (read from its config.json)."""
    if not spec.hf_config or not spec.model_type:
        raise ChipfuseError(f"model {spec.name!r}: family 'hf' needs model_type and hf_config. "
                            "Fix: give --model a Hugging Face config.json")
    return {**spec.hf_config, "model_type": spec.model_type}


def hf_row(model_type: str, *, layout: Layout, saved: SavedCoeffs, fields: FieldReader) -> Family:
    """One Hugging Face architecture: built by transformers (model/hf.py), its tensor-parallel plan and
    refusal from its layout. plan.memory sizes its tensors with the GPT's list (numels_exact False)."""
    return Family(name="hf", model_type=model_type, runtime="chipfuse.model.hf", arch_defaults=llama_arch,
                  default_ffn=llama_ffn, tensor_numels=gpt_numels, numels_exact=False, tp=layout.tp,
                  no_tp=layout.no_tp, layout=layout, saved=saved, hf_weights=True, hf_config=own_config,
                  config_fields=fields)


ROWS: tuple[Family, ...] = (
    hf_row("llama", layout=LLAMA_LIKE, saved=LLAMA_SAVED, fields=rotary_fields()),
    hf_row("mistral", layout=WINDOW, saved=LLAMA_SAVED, fields=rotary_fields()),
    hf_row("qwen2", layout=BY_LAYER_TYPE, saved=LLAMA_SAVED, fields=rotary_fields(qkv_bias=True)),
    # In bf16 the q/k norm's input is a fp32 copy (q, kv) and its normalised product is cast back to
    # bf16 before the weight multiplies it (kept: q, kv).
    hf_row("qwen3", layout=BY_LAYER_TYPE, fields=rotary_fields(qk_norm=True),
           saved=SavedCoeffs(block=LLAMA + QK_NORM, bf16=(LLAMA_BF16[0] + Saved(q=1, heads=1, kv=1, kv_heads=1),
                                                           LLAMA_BF16[1] + Saved(q=1, kv=1)))),
    hf_row("gemma", layout=LLAMA_LIKE, fields=rotary_fields(),
           saved=SavedCoeffs(block=LLAMA, bf16=LLAMA_BF16, norm_plus_one=True, embed_scale=True)),
    # Gemma 2 trains with eager attention (transformers' default for it): see saved.saved_block_parts. In
    # bf16 its four norms keep x, rsqrt and the product in fp32; the fused-SDPA row is changed there.
    hf_row("gemma2", layout=BY_LAYER_TYPE, fields=rotary_fields(norms_per_block=4),
           saved=SavedCoeffs(block=GEMMA2_NORMS + SDPA + GLU, eager_attention=True,
                             bf16=(Saved(h=8, scalars=4, heads=1), Saved(h=5, q=2, kv=2, ffn=4)),
                             norm_plus_one=True, embed_scale=True)),
    # In bf16 Gemma's q/k norm computes in fp32 throughout (its input copy and product: fp32).
    hf_row("gemma3_text", layout=BY_LAYER_TYPE, fields=rotary_fields(qk_norm=True, norms_per_block=4),
           saved=SavedCoeffs(block=GEMMA2_NORMS + QK_NORM + SDPA + GLU,
                             bf16=(Saved(h=8, scalars=4, heads=1) + QK_NORM, Saved(h=5, q=2, kv=2, ffn=4)),
                             norm_plus_one=True, embed_scale=True)),
    # Phi-3: fused qkv_proj (v is a view of its q + 2 kv output), o_proj reads a reshaped copy of
    # the attention output (q), fused gate_up_proj (2 ffn) + silu output + product.
    # In bf16: one linear after each norm (one bf16 input copy each).
    hf_row("phi3", fields=rotary_fields(),
           layout=Layout(kind="rotary", embed="model.embed_tokens", layers="model.layers", last=("model.norm",),
                         masks="window", no_tp="its fused qkv_proj is cut into q, k and v at the whole model's "
                         "head counts (config.num_attention_heads), which a member holding some heads does not "
                         "have"),
           saved=SavedCoeffs(block=RMS_PRE + Saved(q=4, kv=3, heads=1) + RMS_PRE + GLU, qkv_storage=1,
                             bf16=(Saved(h=4, scalars=2, heads=1), Saved(h=2, q=4, kv=3, ffn=4)),
                             dropout={"attn": "attention_dropout", "resid": "resid_pdrop"})),
    # GPT-2: c_attn's one output holds q, k and v (q + 2 kv), log-sum-exp, output (read by c_proj as a
    # view); gelu_new written as Python ops keeps its input, tanh output, 1 + tanh and 0.5 * x, and
    # c_proj keeps its output (5 ffn).
    # In bf16: LayerNorm's x, mean and rstd in fp32, c_attn's and c_fc's bf16 input copies.
    hf_row("gpt2", fields=gpt2_fields,
           layout=Layout(kind="gpt2", embed="transformer.wte", layers="transformer.h", first=("transformer.wpe",),
                         last=("transformer.ln_f",),
                         no_tp="its attention and MLP are Conv1D modules (transposed weights, a fused c_attn split "
                         "at the whole width), which DTensor's colwise/rowwise plans do not split"),
           saved=SavedCoeffs(block=LN_PRE + Saved(q=2, kv=2, heads=1) + LN_PRE + Saved(ffn=5), rotary=False,
                             qkv_storage=1, bf16=(Saved(h=2, scalars=4, heads=1), Saved(h=2, q=2, kv=2, ffn=5)),
                             dropout={"resid": "resid_pdrop", "embed": "embd_pdrop", "attn": "attn_pdrop"},
                             activation_saves=True, position_ids=True)),
    # OPT: q is scaled into a copy (q), k and v are views of their projections (kv each), output (q);
    # fc1's input (h), ReLU's output (ffn), which fc2 reads (the same tensor).
    # In bf16: q, k and v each keep a bf16 copy of the norm output (3 h), fc1 one (h).
    # activation_dropout is a config field OPT's layer never applies.
    hf_row("opt", fields=opt_fields,
           layout=Layout(kind="opt", embed="model.decoder.embed_tokens", layers="model.decoder.layers",
                         first=("model.decoder.embed_positions", "model.decoder.project_in"),
                         last=("model.decoder.final_layer_norm", "model.decoder.project_out"),
                         no_tp="its attention reshapes q, k and v by the whole model's head count "
                         "(self.num_heads), so a member's heads would be read as a shorter sequence"),
           saved=SavedCoeffs(block=LN_PRE + SDPA + LN_PRE + Saved(ffn=1), rotary=False,
                             bf16=(Saved(h=2, scalars=4, heads=1), Saved(h=4, q=2, kv=2, ffn=1)),
                             dropout={"resid": "dropout", "attn": "attention_dropout"}, position_ids=True,
                             project_io=True)),
)
