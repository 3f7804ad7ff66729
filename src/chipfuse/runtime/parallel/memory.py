"""What a stage's memory strategy (plan.memory.Strategy) becomes on a device, beside
runtime.parallel.parallelize, which applies it with the other parallelisms in one order
(checkpointing, then FSDP2 with mixed precision and parameter offload as its policies, then bf16
autocast where FSDP2 did not cast), and the optimizer built after it (`build_plan_optimizer`:
AdamW, or torchao's fp32 | bf16 | int8 | int4 state with optimizer offload).

Every piece is a library's: torch.utils.checkpoint through checkpoint_wrapper, FSDP2's
fully_shard / MixedPrecisionPolicy / CPUOffloadPolicy, torchao's optimizers. Written by hand here
is only the mapping from the plan's words to those calls, and what each leaves on the device
(`device_state_tensors`), which the emulated MemoryMeter counts.

The plan's words and what they become:

- checkpoint "full": every block re-runs its forward in backward; only block inputs are kept.
  "selective": every other block (blocks 0, 2, 4, ...), torchtitan's layer-selective mode with
  frequency 2: about half the activations for about half the recompute. (Op-level selective
  checkpointing would keep matmul outputs inside torch's checkpoint frame, where the emulated
  meter cannot see them; the layer mode is what the meter can count honestly.)
- shard "full" (ZeRO-3): fully_shard(reshard_after_forward=True): parameters, gradients and optimizer
  state are split over the group; a block's parameters are gathered for its forward and again for
  its backward.
  shard "grads" and "optimizer" (ZeRO-2 / ZeRO-1): FSDP2 has no mode that keeps parameters
  replicated, so both map to fully_shard(reshard_after_forward=False): gathered parameters stay
  from forward to the end of backward (one gather per step, not two), so the peak is ZeRO-2's
  (whole parameters + sharded gradients + sharded optimizer state). "optimizer" therefore saves
  as much as "grads" here, and the planner predicts them alike. A data-parallel group always runs
  one of these levels ("none" there is refused before start: plan.dims); over one data rank a
  level divides nothing and runs as "none".
- offload "params": FSDP2 CPUOffloadPolicy: sharded parameters, gradients and the optimizer step live
  in host memory; the device holds only the gathered parameters of the blocks in use. Implies FSDP2
  even on a group of one device. "optimizer": torchao CPUOffloadOptimizer (state and update on the
  host, ZeRO-Offload), on devices with their own memory.
  On a CPU device host memory *is* device memory: offload saves nothing and is refused (PlanError,
  in the planner's pre-flight and here). On an *emulated* accelerator, which runs as a CPU worker,
  offload is emulated: the policies are applied (they move nothing on CPU) and the meter leaves the
  offloaded state out of the device's count, as a real chip would.
- dtype "bf16": bf16 compute with fp32 master weights, on chips that have bf16 (others compute in
  fp32, see plan.memory_model.compute_dtype): FSDP2 MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32) when sharded, else torch.autocast around forward (`apply_autocast`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError
from chipfuse.plan.memory import Strategy
from chipfuse.runtime.parallel.checkpointing import block_modules
from chipfuse.runtime.train.optim_state import build_state_optimizer, leaf_tensors, state_tensors

__all__ = ["apply_autocast", "build_plan_optimizer", "device_memory_config", "device_state_tensors",
           "refuse_host_offload", "watch_gathered"]


def refuse_host_offload(device_name: str, offload: str) -> None:
    """Offload on a CPU device would move memory to itself: refuse with the fix."""
    if offload != "none":
        raise ChipfuseError(
            f"device {device_name!r} is a CPU: its memory is host memory, so offload={offload!r} saves nothing. "
            "Fix: set offload = \"none\" for its stage and use sharding or checkpointing to save memory")


def apply_autocast(model: nn.Module, dtype: str, device_type: str = "cpu") -> None:
    """bf16 compute with fp32 master weights for an unsharded model (FSDP2 casts sharded ones itself):
    autocast around forward; the loss upcasts the logits (model.gpt.loss_sum)."""
    if dtype == "bf16":
        model.forward = torch.autocast(device_type=device_type, dtype=torch.bfloat16)(model.forward)  # type: ignore[method-assign]


def watch_gathered(model: nn.Module, meter) -> None:
    """Make `meter` (runtime.emulate.device.MemoryMeter) count parameters FSDP2 has gathered for compute.

    FSDP2 registers a module's gathered (unsharded) parameters in place of its shards while it
    computes and frees them after, so the plain tensors among model.parameters() are exactly the
    gathered ones. The meter checks before every block's forward, and before its recompute under
    checkpointing (the hook sits on the wrapped block, which the recompute calls again).
    """
    from torch.distributed.tensor import DTensor

    meter.transient = lambda: [p for p in model.parameters() if not isinstance(p, DTensor)]
    for blk in block_modules(model):
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        inner.register_forward_pre_hook(lambda *_: meter.check("gathered parameters"))


def device_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                         offload: str = "none") -> list[torch.Tensor]:
    """Parameters, gradients and optimizer state as the device holds them: local shards under FSDP2,
    quantised state as its codes and scales, and nothing of what `offload` keeps in host memory."""
    out: list[torch.Tensor] = []
    if offload != "params":
        for p in model.parameters():
            out.extend(leaf_tensors(p.data if not hasattr(p, "to_local") else p))
            if p.grad is not None:
                out.extend(leaf_tensors(p.grad))
    if optimizer is not None and offload == "none":
        out.extend(state_tensors(optimizer))
    return out


# ---------------------------------------------------------------------------------------------------
# Worker hooks: the worker calls these and runtime.parallel.parallelize; it knows nothing else of memory strategies.


def device_memory_config(plan, pool, device_name: str) -> Strategy:
    """The memory strategy of the stage holding `device_name` (plan.plan.Plan, cluster.pool.Pool)."""
    from chipfuse.plan.memory import device_strategy

    stage = next(s for r in plan.replicas for s in r.stages if device_name in s.devices)
    return device_strategy(plan, stage, pool.device(device_name).chip)


def build_plan_optimizer(params, strategy: Strategy, *, plan, lr: float,
                         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The trainer's optimizer (runtime.train.optim) unless the plan asks for low-bit state or offload."""
    if strategy.optimizer_dtype == "fp32" and strategy.offload != "optimizer":
        from chipfuse.runtime.train.optim import build_optimizer

        return build_optimizer(params, plan, lr=lr, weight_decay=weight_decay)
    params = list(params)
    return build_state_optimizer(params, optimizer_dtype=strategy.optimizer_dtype, lr=lr, weight_decay=weight_decay,
                                 offload=strategy.offload == "optimizer", device=params[0].device)
