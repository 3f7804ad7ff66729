"""Tiny Hugging Face decoder folders for the serving tests: made from configs, saved locally, never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(200)]


def tiny_model(path: Path, arch: str = "llama", *, layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random `arch` (llama | qwen2 | gpt2) with a word-level tokenizer into `path`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    vocab = 256
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                         bos_token_id=1, eos_token_id=2)
    else:
        kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2)
        cfg = LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger weights than the default init: logits far apart, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    _tokenizer(path)
    return path


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def reference(path: Path, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy generate on one device: the tokens every parallel path must equal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, min_new_tokens=max_new)
    return out[0, len(prompt):].tolist()
