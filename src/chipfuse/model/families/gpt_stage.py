"""The built-in GPT's torch side: its stage module, its builds and its tensor-parallel block forward.

Named by model/families/gpt.py's row (Family.runtime) and imported only when a stage is built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chipfuse.model.gpt import GPT, build_model, gpt_init
from chipfuse.model.init import materialise, no_init
from chipfuse.model.spec import ModelSpec
from chipfuse.model.split import EMBED_UNIT, HEAD_UNIT, StageModule, StagePart, block_unit


class GPTStage(StageModule):
    """A run of the built-in GPT's blocks (chipfuse.model.gpt.GPT)."""

    tok_emb: Any
    pos_emb: Any
    blocks: Any
    ln_f: Any
    head: Any

    def __init__(self, full: Any, stage: StagePart, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode, self.tied = first, last, stage.checkpoint, {}
        if first:
            self.tok_emb, self.pos_emb = full.tok_emb, full.pos_emb
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in stage.layers})
        if last:
            self.ln_f, self.head = full.ln_f, full.head

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:
            return x
        pos = torch.arange(x.shape[1], device=x.device)
        return self.tok_emb(x) + self.pos_emb(pos)  # (B, T) ids -> (B, T, C)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks.values():
            h = self._run_block(blk, h)
        return self.head(self.ln_f(h)) if self.last else h

    def _unit_of(self, name: str) -> str:
        top = name.split(".")[0]
        if top in ("tok_emb", "pos_emb"):
            return EMBED_UNIT
        if top in ("ln_f", "head"):
            return HEAD_UNIT
        return block_unit(int(name.split(".")[1]))


def build_full(spec: ModelSpec, seed: int) -> nn.Module:
    return build_model(spec, seed)


def build_stage(spec: ModelSpec, stage: StagePart, *, first: bool, last: bool, seed: int, full: nn.Module | None,
                device: str | torch.device) -> StageModule:
    if full is not None:
        return GPTStage(full, stage, first=first, last=last)
    with torch.device("meta"), no_init():
        meta = GPT(spec)
    mod = GPTStage(meta, stage, first=first, last=last)
    materialise(mod, gpt_init(spec.num_layers), seed, device=device)
    return mod


def tp_block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """chipfuse.model.gpt.Block.forward with this member's heads (q, k, v each C / tp wide): the fused
    qkv's local output is [q_r | k_r | v_r], so the heads come from the width, not from num_heads."""
    B, T, C = x.shape
    q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=2)
    hs = C // self.num_heads
    q, k, v = (t.reshape(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
    return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
