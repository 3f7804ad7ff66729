"""Stage modules: one contiguous run of a model's layers, cut out of a full model.

Every layout starts from the same weights: the full model is built with the plan's seed on every
rank and each rank keeps only its stage's pieces. Stage modules keep the full model's parameter
names (`blocks.3.qkv.weight`, `model.layers.1.mlp.up_proj.weight`), so gradients of any layout
compare name by name with a single-device reference, and gradient reduction can group
parameters by the layer they belong to.

torch.distributed.pipelining needs stage modules that take and return tensors: the first stage
takes token ids (B, T) and returns hidden states (B, T, C), middle stages take and return hidden
states, the last returns logits (B, T, vocab). The loss is computed outside (by the schedule).

Written by hand (not by pipelining's tracer) because the stages have unequal layer counts
chosen by the planner, and Llama's rotary embeddings must be recomputed on every stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from chipfuse.errors import PlanError
from chipfuse.model.gpt import build_model
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import Stage

EMBED_UNIT = "embed"
HEAD_UNIT = "head"


def block_unit(layer: int) -> str:
    return f"block{layer}"


class StageModule(nn.Module):
    """Base: `pre` (embedding on stage 0), `body` (blocks, then norm and head on the last stage).

    `units` maps a gradient-reduction unit (embed, block<i>, head) to this module's parameter
    names of that unit: the ranks holding the same unit reduce its gradients together.
    """

    first: bool
    last: bool
    checkpoint_mode: str
    # Submodules are registered under the full model's names; typed loosely for that reason.
    blocks: Any
    tok_emb: Any
    pos_emb: Any
    ln_f: Any
    head: Any
    model: Any
    lm_head: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre(x))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def body(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def units(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            out.setdefault(self._unit_of(name), []).append(name)
        return out

    def _unit_of(self, name: str) -> str:
        raise NotImplementedError

    def _run_block(self, blk: Any, h: torch.Tensor, *extra: Any) -> torch.Tensor:
        # "selective" keeps the cheap norms' outputs in a full-recompute world: on these small
        # blocks both modes recompute the block, which is what a planner charging 1/3 extra
        # forward for selective would under-count; the cost model owns that difference.
        if self.checkpoint_mode != "none" and torch.is_grad_enabled():
            return checkpoint(blk, h, *extra, use_reentrant=False)
        return blk(h, *extra)


def _put(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register `module` at `dotted` under root, creating empty containers on the way."""
    *path, leaf = dotted.split(".")
    node = root
    for p in path:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


class GPTStage(StageModule):
    """A run of the built-in GPT's blocks (chipfuse.model.gpt.GPT)."""

    def __init__(self, full: Any, stage: Stage, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode = first, last, stage.checkpoint
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


def llama_config(spec: ModelSpec) -> Any:
    """A transformers LlamaConfig of the spec's shape (no weights are ever downloaded)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.ffn,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.seq_len,
                      tie_word_embeddings=False, use_cache=False)
    # sdpa with no mask is causal; the eager path would need an explicit mask on every stage.
    cfg._attn_implementation = "sdpa"
    return cfg


def build_llama(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """transformers LlamaForCausalLM from the spec, with seeded random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec))


class LlamaStage(StageModule):
    """A run of a Hugging Face LlamaForCausalLM's decoder layers.

    Rotary embeddings (cos, sin) are not passed between stages: every stage holds its own copy
    of the parameter-free rotary module and recomputes them from the positions, so that stages
    exchange one tensor only.
    """

    def __init__(self, full: Any, stage: Stage, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode = first, last, stage.checkpoint
        if first:
            _put(self, "model.embed_tokens", full.model.embed_tokens)
        _put(self, "model.layers", nn.ModuleDict({str(i): full.model.layers[i] for i in stage.layers}))
        _put(self, "model.rotary_emb", full.model.rotary_emb)
        if last:
            _put(self, "model.norm", full.model.norm)
            _put(self, "lm_head", full.lm_head)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(x) if self.first else x

    def body(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device)[None, :]
        cos_sin = self.model.rotary_emb(h, position_ids=pos)
        for blk in self.model.layers.values():
            h = self._run_block(lambda x, b=blk: b(x, position_embeddings=cos_sin), h)
        return self.lm_head(self.model.norm(h)) if self.last else h

    def _unit_of(self, name: str) -> str:
        if name.startswith("model.embed_tokens"):
            return EMBED_UNIT
        if name.startswith("model.norm") or name.startswith("lm_head"):
            return HEAD_UNIT
        return block_unit(int(name.split(".")[2]))


def build_full(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The whole model of the spec's family: the single-device reference and the source of stages."""
    if spec.family == "gpt":
        return build_model(spec, seed)
    if spec.family == "llama":
        return build_llama(spec, seed)
    raise PlanError(f"model {spec.name!r}: family {spec.family!r} has no stage builder. Fix: use 'gpt' or 'llama'")


def full_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of a model from build_full, whatever its family."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def build_stage(spec: ModelSpec, stages: tuple[Stage, ...], index: int, *, seed: int = 0,
                full: nn.Module | None = None) -> StageModule:
    """The stage module for stages[index] of one replica, cut from a full model built with `seed`."""
    full = full if full is not None else build_full(spec, seed)
    cls = GPTStage if spec.family == "gpt" else LlamaStage
    return cls(full, stages[index], first=index == 0, last=index == len(stages) - 1)
