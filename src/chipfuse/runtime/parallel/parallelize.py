"""Apply a plan's stage to its module, the parallelisms in one documented order (as torchtitan's
parallelize does, here per stage and with groups that differ from stage to stage):

    0. stage cut      model.split.build_stage: the stage's blocks, by module names
  0.5. converters     model.converters.apply_converters: the plan's freeze (requires_grad False), later
                      LoRA adapters or a quantised base; before step 1 so every parallelism sees them
    1. tensor parallel runtime.parallel.tp: DTensor colwise/rowwise over the group's mesh (tp groups)
    2. checkpointing  runtime.parallel.checkpointing: none | selective (every other layer) | full
    3. FSDP2          runtime.parallel.fsdp: shard over the group's mesh (sharded groups), parameter
                      offload, bf16 mixed precision as FSDP2 policies
    4. compute dtype  bf16 autocast around forward when FSDP2 did not take it (fp32 master weights)
    5. optimizer      runtime.train.optim_state via runtime.parallel.memory: fp32 | bf16 | int8 | int4 state, offload

torch.compile is left out: on CPU workers its first step costs more than a short run gains, and
on accelerators the same order admits it after step 4 (torchtitan compiles per block there).

Adding a parallelism is its function in runtime/parallel/, its plan field, its place in this list
and its tests. Each step reads only the plan's words for this stage (runtime.parallel.memory.MemoryConfig)
and the group's mesh from the topology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from chipfuse.model.spec import ModelSpec
from chipfuse.runtime.parallel.checkpointing import apply_checkpointing
from chipfuse.runtime.parallel.fsdp import apply_fsdp, uses_fsdp
from chipfuse.runtime.parallel.memory import MemoryConfig, apply_autocast
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


def fsdp_shard_mode(shard: str, kind: str) -> str:
    """A sharded group (several devices, no tensor parallel) whose plan says shard = "none" still
    splits its micro-batches over FSDP2: it keeps gradients and optimizer state sharded (ZeRO-2), which
    uses no more memory than the replicated layout the plan priced."""
    return "grads" if kind == "fsdp" and shard == "none" else shard


def parallelize(module: nn.Module, cfg: MemoryConfig, *, model: ModelSpec, kind: str, mesh: Any,
                device_type: str) -> Applied:
    """Apply steps 1-4 to `module` in place. kind: the stage group's kind (single | tp | fsdp)."""
    tp = 0
    if kind == "tp":
        apply_tp(module, mesh, model)
        tp = mesh.size()
    layers = apply_checkpointing(module, cfg.checkpoint)
    shard = fsdp_shard_mode(cfg.shard, kind) if kind != "single" else "none"
    # Under tensor parallel, parameter offload is only counted (emulated devices; Topology.check
    # refuses it on real chips): FSDP2 cannot share the group's 1-D mesh with DTensor's plan.
    fsdp = kind != "tp" and uses_fsdp(shard, cfg.offload, 2 if kind == "fsdp" else 1)
    if fsdp:
        apply_fsdp(module, shard=shard, mesh=mesh, offload=cfg.offload, dtype=cfg.dtype)
    else:
        apply_autocast(module, cfg.dtype, device_type)
    return Applied(tp_degree=max(1, tp), checkpointed_layers=tuple(layers), fsdp=fsdp, shard=shard if fsdp else "none",
                   offload=cfg.offload, dtype=cfg.dtype, autocast=cfg.dtype == "bf16" and not fsdp)


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
