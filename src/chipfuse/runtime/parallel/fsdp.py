"""FSDP2 sharding of a stage over its group's DeviceMesh (ZeRO-1/2/3 as the plan says).

- shard "full" (ZeRO-3): fully_shard(reshard_after_forward=True): parameters, gradients and
  optimizer state split over the group; a block's parameters are gathered for its forward and
  again for its backward.
- shard "grads" and "optimizer" (ZeRO-2 / ZeRO-1): FSDP2 has no mode that keeps parameters
  replicated, so both map to fully_shard(reshard_after_forward=False): gathered parameters stay from
  forward to the end of backward (one gather per step, not two), so the peak is ZeRO-2's. The
  planner predicts them alike.
- offload "params": FSDP2 CPUOffloadPolicy (sharded parameters, gradients and the optimizer step in
  host memory); implies FSDP2 even on a group of one device.
Whether FSDP2 wraps a stage at all, and at which level, is decided once by the group's degrees
(plan.dims.GroupDims.wraps_fsdp and .zero); parallelize asks there and calls apply_fsdp.
- dtype "bf16": MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): gradients are reduced in
  fp32, since summing many bf16 shards loses the small ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from chipfuse.runtime.parallel.checkpointing import block_modules


def apply_fsdp(module: nn.Module, *, shard: str, mesh: Any = None, offload: str = "none",
               dtype: str = "fp32") -> bool:
    """fully_shard every block, then the root. Returns False when nothing was sharded.
    `mesh`: the stage group's 1-D DeviceMesh (None = the whole world)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if shard == "none" and offload != "params":
        return False
    kw: dict = {"mesh": mesh}
    if dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # pin_memory only helps copies to an accelerator, and needs one to exist.
    kw["offload_policy"] = (CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if offload == "params"
                            else OffloadPolicy())
    reshard = shard in ("full", "none")  # "none" here means: offload only, ZeRO-3 layout on one device
    for blk in block_modules(module):
        fully_shard(blk, reshard_after_forward=reshard, **kw)
    # The root's parameters (embeddings, head) are used first in backward: keep them gathered.
    fully_shard(module, reshard_after_forward=False, **kw)
    # chipfuse divides each rank's loss by the GLOBAL token count, so gradients are to be summed,
    # not averaged. A divide factor of 1 alone asks for PREMUL_SUM, which gloo lacks; with force-sum
    # FSDP2 reduces with plain SUM and divides by 1 (a no-op).
    for m in module.modules():
        if isinstance(m, FSDPModule):  # each FSDP unit reduces its own gradients
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return True
