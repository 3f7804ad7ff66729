"""A GPT-style decoder (nanoGPT shape), built so that any run of its blocks can be a stage."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from chipfuse.model.init import materialise, no_init
from chipfuse.model.spec import ModelSpec


class Block(nn.Module):
    def __init__(self, cfg: ModelSpec):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, cfg.ffn)
        self.fc_out = nn.Linear(cfg.ffn, cfg.dim)
        self.num_heads = cfg.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). `blocks` may be sliced into pipeline stages."""

    def __init__(self, cfg: ModelSpec):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Weights: build_model initialises every module by name (model/init.py), so any stage
        # of any layout starts from the reference's numbers.

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(x)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tok_emb(idx) + self.pos_emb(pos)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


def gpt_init(num_layers: int) -> Callable[[str, nn.Module], None]:
    """The built-in GPT's initialisation (nanoGPT's), for one module given its full name:
    normal(0.02) matrices, zero biases, residual projections scaled by 1/sqrt(2 * layers)."""

    def init(name: str, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith((".proj", ".fc_out")) else 0.02
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    return init


def build_model(cfg: ModelSpec, seed: int = 0) -> GPT:
    """Same seed, same weights on every rank, in every stage and in every reference: built on the
    meta device, then each module initialised from a generator seeded by (seed, its name)."""
    with torch.device("meta"), no_init():
        model = GPT(cfg)
    materialise(model, gpt_init(cfg.num_layers), seed)
    return model


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy. Callers divide by the global token count, so that the sum of
    every rank's gradient is the gradient of the global mean loss, whatever the shares."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
