"""Apply a plan's stage to its module, the parallelisms in one documented order (as torchtitan's
parallelize does, here per stage and with groups that differ from stage to stage):

    0. stage cut      model.build.build_stage: the stage's blocks, by module names
  0.5. converters     model.converters.apply_converters: the plan's freeze (requires_grad False), later
                      LoRA adapters or a quantised base; before step 1 so every parallelism sees them
    1. tensor parallel runtime.parallel.tp: DTensor colwise/rowwise over the group's mesh (tp groups)
    2. checkpointing  runtime.parallel.checkpointing: none | selective (every other layer) | full
    3. FSDP2          runtime.parallel.fsdp: shard over the group's mesh (sharded groups), parameter
                      offload, bf16 mixed precision as FSDP2 policies
    4. compute dtype  bf16 autocast around forward when FSDP2 did not take it (fp32 master weights)
    5. optimizer      runtime.parallel.memory.build_plan_optimizer (the trainer's AdamW, or torchao's
                      bf16 | int8 | int4 state and optimizer offload), called by the caller after this

torch.compile is left out: on CPU workers its first step costs more than a short run gains, and
on accelerators the same order admits it after step 4 (torchtitan compiles per block there).

Adding a parallelism is its function in runtime/parallel/, its plan field, its place in this list
and its tests. Each step reads only the plan's words for this stage (plan.memory.Strategy), the
group's degrees (plan.dims.GroupDims: its kind and ZeRO level, decided there and nowhere else) and
the group's mesh from the topology. This is the one apply path: the trainer's workers and the
memory probe (runtime.measure.memory_probe) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from chipfuse.model.spec import ModelSpec
from chipfuse.plan.dims import GroupDims
from chipfuse.plan.memory import Strategy
from chipfuse.runtime.parallel.checkpointing import apply_checkpointing
from chipfuse.runtime.parallel.fsdp import apply_fsdp
from chipfuse.runtime.parallel.memory import apply_autocast
from chipfuse.runtime.parallel.tp import apply_tp


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What parallelize did to a stage (reported in the summary, checked by tests)."""

    tp_degree: int
    checkpointed_layers: tuple[int, ...]
    fsdp: bool
    shard: str
    offload: str
    dtype: str
    autocast: bool

    def to_dict(self) -> dict:
        return {"tp_degree": self.tp_degree, "checkpointed_layers": list(self.checkpointed_layers),
                "fsdp": self.fsdp, "shard": self.shard, "offload": self.offload, "dtype": self.dtype,
                "autocast": self.autocast}


def parallelize(module: nn.Module, strategy: Strategy, *, dims: GroupDims, model: ModelSpec, mesh: Any,
                device_type: str) -> Applied:
    """Apply steps 1-4 to `module` in place, as `dims` (the stage group's degrees) and `strategy` say."""
    tp = 0
    if dims.kind == "tp":
        apply_tp(module, mesh, model)
        tp = mesh.size()
    layers = apply_checkpointing(module, strategy.checkpoint)
    fsdp = dims.wraps_fsdp(strategy.offload)
    if fsdp:
        apply_fsdp(module, shard=dims.zero, mesh=mesh, offload=strategy.offload, dtype=strategy.dtype)
    else:
        apply_autocast(module, strategy.dtype, device_type)
    return Applied(tp_degree=max(1, tp), checkpointed_layers=tuple(layers), fsdp=fsdp, shard=dims.zero if fsdp else "none",
                   offload=strategy.offload, dtype=strategy.dtype, autocast=strategy.dtype == "bf16" and not fsdp)


def local_full_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, under the unwrapped model's names (collective inside a
    tensor-parallel or sharded group: DTensor gradients are gathered)."""
    from chipfuse.runtime.parallel.checkpointing import clean_name

    out = {}
    for n, p in module.named_parameters():
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[clean_name(n)] = g.detach().clone()
    return out
