"""chipfuse's built-in GPT (model/gpt.py): LayerNorm, GELU MLP, learned positions, biases, fused qkv.

Pure: what the planner reads. Its torch side (the stage module, its build and its tensor-parallel
block forward) is model/families/gpt_stage.py.
"""

from __future__ import annotations

from typing import Any

from chipfuse.model.family import Family, Numels, Spec

# Megatron's split of the GPT block: the fused qkv by output columns, q, k and v each (its own
# strided split, runtime/parallel/tp.py), the projections back by input rows.
GPT_TP = {"qkv": "fused_qkv", "proj": "rowwise", "fc": "colwise", "fc_out": "rowwise"}


def gpt_arch(spec: Spec) -> dict[str, Any]:
    return {"norm": "layernorm", "qkv_bias": True, "out_bias": True, "mlp_bias": True, "gated_mlp": False,
            "position_rows": spec.seq_len}


def gpt_numels(spec: Spec) -> Numels:
    """model.gpt.GPT's tensors: ln1 (2), qkv (2), proj (2), ln2 (2), fc (2), fc_out (2) per block;
    token and position tables; final LayerNorm and the untied head."""
    h, f, V = spec.dim, spec.ffn, spec.vocab_size
    block = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, f * h, f, h * f, h]
    return block, [V * h, spec.seq_len * h], [h, h, V * h]


FAMILY = Family(
    name="gpt", runtime="chipfuse.model.families.gpt_stage", arch_defaults=gpt_arch,
    default_ffn=lambda dim: 4 * dim, tensor_numels=gpt_numels, tp=GPT_TP, ties_embeddings=False,
    rehearsal_preset="tiny")
