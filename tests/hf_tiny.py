"""Tiny Hugging Face configs of every architecture chipfuse splits, made here (never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

V, H, L, HEADS, POS = 256, 64, 3, 4, 64
_ROTARY = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": HEADS,
           "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": POS,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Dropout off everywhere (GPT-2 and OPT default to 0.1): a layout comparison needs a
# deterministic forward. Sliding windows shorter than the test sequence, so they matter.
TINY: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_ROTARY},
    "mistral": {"model_type": "mistral", **_ROTARY, "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", **_ROTARY, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", **_ROTARY, "head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", **_ROTARY, "head_dim": 16, "sliding_window": 16},
    "gemma3_text": {"model_type": "gemma3_text", **_ROTARY, "head_dim": 16, "sliding_window": 16},
    "phi3": {"model_type": "phi3", **_ROTARY},
    "gpt2": {"model_type": "gpt2", "vocab_size": V, "n_embd": H, "n_layer": L, "n_head": HEADS, "n_positions": POS,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2},
    "opt": {"model_type": "opt", "vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": HEADS,
            "ffn_dim": 128, "max_position_embeddings": POS, "word_embed_proj_dim": 32, "dropout": 0.0,
            "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2},
}


def hf_model(raw: dict[str, Any], seed: int = 0) -> Any:
    """transformers' own model of a config, with transformers' own random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**raw)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny(raw: dict[str, Any], folder: Path, seed: int = 0) -> Any:
    """Save transformers' model of `raw` (config.json + model.safetensors) into `folder`."""
    model = hf_model(raw, seed)
    model.save_pretrained(str(folder))
    return model
