"""Stage modules: one contiguous run of a model's layers, built without the rest of the model.

No rank materialises more than its own part: the whole model is built on the meta device (no
memory), the stage keeps the modules it runs, and only those are materialised (`to_empty`) and
initialised by name (model/init.py). This module holds what every family's stage shares (the
gradient-reduction units, tied matrices); each family's own stage class lives with its family
(model/families/), and model/build.py picks it through the registry.

Stage modules keep the full model's parameter names (`blocks.3.qkv.weight`,
`model.layers.1.mlp.up_proj.weight`), so gradients of any layout compare name by name with a
single-device reference, checkpoints key tensors by those names, and `--init-from` finds each
tensor in a Hugging Face safetensors file under the same name.

torch.distributed.pipelining needs stage modules that take and return tensors: the first stage
takes token ids (B, T) and returns hidden states (B, T, C), middle stages take and return hidden
states, the last returns logits (B, T, vocab). The loss is computed outside (by the schedule).

Tied embeddings: when the first and the last stage are different modules, the last keeps its own
copy of the tied matrix (initialised and loaded as the embedding), and both belong to the
gradient-reduction unit TIED_UNIT, held by the first and last stage of every replica: summing
its gradient over those ranks gives each copy the tied weight's one gradient, so the copies stay
equal step after step. A stage that is both first and last holds the matrix once, tied as in
transformers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec

EMBED_UNIT = "embed"
HEAD_UNIT = "head"
TIED_UNIT = "tied"


def block_unit(layer: int) -> str:
    return f"block{layer}"


class StagePart(Protocol):
    """What a stage builder reads of a plan's Stage (chipfuse.plan.plan.Stage)."""

    @property
    def layers(self) -> range: ...

    @property
    def checkpoint(self) -> str: ...


class StageModule(nn.Module):
    """Base: `pre` (embedding on stage 0), `body` (blocks, then norm and head on the last stage).

    `units()` maps a gradient-reduction unit (embed, block<i>, head, tied) to this module's
    parameter names of that unit: the ranks holding the same unit reduce its gradients together.
    """

    first: bool
    last: bool
    checkpoint_mode: str
    tied: dict[str, str]
    """Tied parameter (the head's copy) -> the parameter it is tied to (the embedding), by name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre(x))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def body(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def units(self) -> dict[str, list[str]]:
        # Every unit the stage holds is listed, even one left empty because its only matrix is the
        # tied one (a tied Llama-like embedding): the reducer lists units by the plan.
        out: dict[str, list[str]] = {}
        if self.first:
            out[EMBED_UNIT] = []
        if self.last:
            out[HEAD_UNIT] = []
        tied_names = set(self.tied) | set(self.tied.values())
        for name, _ in self.named_parameters():
            out.setdefault(TIED_UNIT if name in tied_names else self._unit_of(name), []).append(name)
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


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def has_tied_unit(spec: ModelSpec) -> bool:
    """Whether the model's first and last stage share a matrix (a family may never tie: the built-in GPT)."""
    return spec.tie_embeddings and family_of(spec).ties_embeddings


def tied_keys(model: nn.Module) -> dict[str, str]:
    """transformers' {tied parameter: its source} of a model whose config ties them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "all_tied_weights_keys", None) or {}
    return dict(keys)
