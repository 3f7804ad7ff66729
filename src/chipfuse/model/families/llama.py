"""The Llama presets (model/spec.py SPEC_PRESETS): a Llama shape given by its numbers alone, built as
transformers' LlamaForCausalLM (its torch side is model/hf.py, as every Hugging Face architecture's)."""

from __future__ import annotations

from typing import Any

from chipfuse.model.arch import LLAMA, LLAMA_BF16, LLAMA_LIKE, SavedCoeffs
from chipfuse.model.family import Family, Numels, Spec

LLAMA_SAVED = SavedCoeffs(block=LLAMA, bf16=LLAMA_BF16)


def llama_arch(spec: Spec) -> dict[str, Any]:
    """RMSNorm, no biases, SwiGLU, rotary positions: the defaults of every transformers decoder row."""
    return {"norm": "rmsnorm", "qkv_bias": False, "out_bias": False, "mlp_bias": False, "gated_mlp": True,
            "position_rows": 0}


def llama_ffn(dim: int) -> int:
    """Llama's rule: 2/3 of 4 x dim, rounded up to a multiple of 256."""
    h = int(2 * 4 * dim / 3)
    return 256 * ((h + 255) // 256)


def llama_numels(spec: Spec) -> Numels:
    """LlamaForCausalLM's tensors: RMSNorm, q/k/v/o without biases, RMSNorm, gate/up/down; no positions."""
    h, f, V = spec.dim, spec.ffn, spec.vocab_size
    kv = spec.kv_heads * (h // spec.num_heads)
    block = [h, h * h, kv * h, kv * h, h * h, h, f * h, f * h, h * f]
    return block, [V * h], [h] + ([] if spec.tie_embeddings else [V * h])


def llama_config(spec: Spec) -> dict[str, Any]:
    """transformers' LlamaConfig fields for the spec's numbers."""
    return {"model_type": "llama", "vocab_size": spec.vocab_size, "hidden_size": spec.dim,
            "intermediate_size": spec.ffn, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": spec.seq_len, "tie_word_embeddings": spec.tie_embeddings}


FAMILY = Family(
    name="llama", runtime="chipfuse.model.hf", arch_defaults=llama_arch, default_ffn=llama_ffn,
    tensor_numels=llama_numels, tp=LLAMA_LIKE.tp, layout=LLAMA_LIKE, saved=LLAMA_SAVED, hf_weights=True,
    hf_config=llama_config, gated_mlp_kernels=True)
