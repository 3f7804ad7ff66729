"""Tensor parallel inside a stage group: torch.distributed.tensor's parallelize_module with
colwise/rowwise plans for attention and MLP, on the group's 1-D DeviceMesh.

Megatron's layout: the first matrix of attention (q, k, v) and of the MLP is split by output
columns, the second by input rows, so each block needs one all-reduce in forward and one in backward
per sub-layer, done by DTensor. Norms, the embedding and the head stay whole on every member; their
gradients come out whole and equal on every member.

Per family, the module names come from its row (model/registry.py, Family.tp):
- built-in GPT: a fused `qkv` Linear whose rows are [q | k | v] ('fused_qkv'). Splitting it by plain
  Shard(0) would give member 0 all of q and half of k, so it is split with
  _StridedShard(0, split_factor=3): each member holds its heads of q, of k and of v, and the
  parameter still reads as the full [q|k|v] matrix (full_tensor(), checkpoints). Its block forward
  is rebound to the family's one that counts local heads (model/families/gpt_stage.py).
- Hugging Face decoders: transformers' own names, from the architecture's layout (Layout.tp;
  Llama-like: q/k/v/gate/up colwise, o/down rowwise, the attention inferring the local head count
  from the projection's width). Architectures without a plan (GPT-2, OPT, Phi-3) are refused
  before start by runtime.parallel.topology, with the reason registry.tp_refusal gives.
"""

from __future__ import annotations

import types
from typing import Any

import torch.nn as nn

from chipfuse.model.build import tp_block_forward
from chipfuse.model.registry import family_of, tp_refusal
from chipfuse.model.spec import ModelSpec
from chipfuse.runtime.parallel.checkpointing import blocks_of


def tp_plan(spec: ModelSpec) -> dict[str, str]:
    """The model's plan: module name inside one block -> colwise | rowwise | fused_qkv."""
    why = tp_refusal(spec)
    if why is not None:
        raise ValueError(f"no tensor-parallel plan: {why}")
    return dict(family_of(spec).tp or {})


def _fused_colwise(parts: int) -> Any:
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class FusedColwise(ColwiseParallel):
        """ColwiseParallel for a Linear whose output rows are `parts` matrices stacked."""

        def _partition_linear_fn(self, name, module, device_mesh):  # type: ignore[no-untyped-def]
            for n, p in list(module.named_parameters()):
                # Every member built the same weights (one seed): each keeps its slice, no message.
                d = distribute_tensor(p, device_mesh, [_StridedShard(0, split_factor=parts)], src_data_rank=None)
                module.register_parameter(n, nn.Parameter(d))

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):  # type: ignore[no-untyped-def]
            return outputs.to_local()  # [q_r | k_r | v_r]: this member's heads, no redistribution

    return FusedColwise()


def _style(kind: str) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    return _fused_colwise(3)


def apply_tp(module: nn.Module, mesh: Any, spec: ModelSpec) -> int:
    """Tensor-parallelize every block of a stage module (or a whole model) of `spec` over `mesh`.
    Returns the number of blocks parallelized."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tp_plan(spec)
    forward = tp_block_forward(spec)
    blocks = blocks_of(module)
    for container, key, _layer in blocks:
        blk = container[key]
        parallelize_module(blk, mesh, {name: _style(kind) for name, kind in plan.items()})
        if forward is not None:
            blk.forward = types.MethodType(forward, blk)
    return len(blocks)
