"""Tensor parallel inside a stage group: torch.distributed.tensor's parallelize_module with
colwise/rowwise plans for attention and MLP, on the group's 1-D DeviceMesh.

Megatron's layout: the first matrix of attention (q, k, v) and of the MLP is split by output
columns, the second by input rows, so each block needs one all-reduce in forward and one in backward
per sub-layer, done by DTensor. Norms, the embedding and the head stay whole on every member; their
gradients come out whole and equal on every member.

Per architecture, the module names:
- built-in GPT (this file): a fused `qkv` Linear whose rows are [q | k | v]. Splitting it by plain
  Shard(0) would give member 0 all of q and half of k, so it is split with
  _StridedShard(0, split_factor=3): each member holds its heads of q, of k and of v, and the
  parameter still reads as the full [q|k|v] matrix (full_tensor(), checkpoints). Its block forward
  is rebound to one that counts local heads.
- Hugging Face decoders: transformers' own names, from the architecture's row of model/arch.py
  (Layout.tp; Llama-like: q/k/v/gate/up colwise, o/down rowwise, the attention inferring the local
  head count from the projection's width). Architectures without a plan there (GPT-2, OPT,
  Phi-3) are refused before start by runtime.parallel.topology, with the reason arch.tp_refusal gives.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chipfuse.model.arch import layout_of, tp_refusal
from chipfuse.model.spec import ModelSpec
from chipfuse.runtime.parallel.checkpointing import blocks_of

GPT_PLAN = {"qkv": "fused_qkv", "proj": "rowwise", "fc": "colwise", "fc_out": "rowwise"}


def tp_plan(spec: ModelSpec) -> dict[str, str]:
    """The model's plan: module name inside one block -> colwise | rowwise | fused_qkv."""
    why = tp_refusal(spec)
    if why is not None:
        raise ValueError(f"no tensor-parallel plan: {why}")
    return GPT_PLAN if spec.family == "gpt" else dict(layout_of(spec).tp or {})


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


def _gpt_block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """chipfuse.model.gpt.Block.forward with this member's heads (q, k, v each C / tp wide)."""
    B, T, C = x.shape
    q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=2)
    hs = C // self.num_heads
    q, k, v = (t.reshape(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
    return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


def apply_tp(module: nn.Module, mesh: Any, spec: ModelSpec) -> int:
    """Tensor-parallelize every block of a stage module (or a whole model) of `spec` over `mesh`.
    Returns the number of blocks parallelized."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tp_plan(spec)
    blocks = blocks_of(module)
    for container, key, _layer in blocks:
        blk = container[key]
        parallelize_module(blk, mesh, {name: _style(kind) for name, kind in plan.items()})
        if spec.family == "gpt":
            blk.forward = types.MethodType(_gpt_block_forward, blk)
    return len(blocks)
