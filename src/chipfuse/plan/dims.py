"""The named degrees of one stage group, and what kind of group they make: decided here, once.

A stage group's devices multiply out as tp x dp x ep x cp (tensor, data/shard, expert, context),
as torchtitan's ParallelDims does for a whole job; here each stage group has its own, since groups
differ from stage to stage. The planner writes every degree into the plan; the topology, the memory
and cost models, parallelize and the pipeline read `kind` and `zero` from here instead of working
them out from the device count again.

The ZeRO level is the plan's `shard` word. On a data-parallel group (dp > 1) the members split every
micro-batch and FSDP2 keeps their replicas in step, so the group is always sharded: its level is
optimizer | grads | full, and "none" there is refused (Plan.check), never quietly run as something
else. Over a data degree of 1 sharding divides nothing, so any level runs as "none" (`zero`).

Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GroupKind = Literal["single", "tp", "fsdp"]
"""single: one device. tp: every member computes every sample with 1/tp of each matrix.
fsdp: every member computes 1/dp of each micro-batch, the stage sharded over them (FSDP2)."""


@dataclass(frozen=True, kw_only=True)
class GroupDims:
    """The degrees of one stage group (their product is its device count) and its ZeRO level."""

    tp: int = 1
    """Tensor-parallel degree: each attention and MLP matrix split over tp devices."""
    dp: int = 1
    """Data (shard) degree: each micro-batch split over dp devices, the stage sharded over them."""
    ep: int = 1
    """Expert-parallel degree (room for MoE; the runtime refuses > 1 for now)."""
    cp: int = 1
    """Context-parallel degree (the sequence split; the runtime refuses > 1 for now)."""
    shard: str = "none"
    """The plan's ZeRO level: none | optimizer | grads | full."""

    @property
    def size(self) -> int:
        return self.tp * self.dp * self.ep * self.cp

    @property
    def kind(self) -> GroupKind:
        """What the group is. A group that mixes degrees (say tp=2 x dp=2) is "tp" here and is
        refused before start (runtime.parallel.topology) until one 2-D mesh runs both."""
        if self.size == 1:
            return "single"
        return "fsdp" if self.dp == self.size else "tp"

    @property
    def zero(self) -> str:
        """The ZeRO level that runs: the plan's, except over a data degree of 1, which it cannot divide."""
        return self.shard if self.dp > 1 else "none"

    def wraps_fsdp(self, offload: str) -> bool:
        """Whether FSDP2 wraps the stage: a sharded group, or parameter offload (FSDP2's CPU offload
        policy, even on one device). Under tensor parallel offload is only counted (emulated devices;
        real chips are refused before start): FSDP2 cannot share the group's 1-D mesh with DTensor."""
        return self.zero != "none" or (offload == "params" and self.tp == 1)

    def problems(self, num_devices: int) -> list[tuple[str, str]]:
        """Every way these degrees do not describe a group of `num_devices`, each as (problem, fix);
        empty when they do."""
        out = [(f"{name}_degree is {v}", f"use {name}_degree >= 1") for name, v in
               (("tp", self.tp), ("dp", self.dp), ("ep", self.ep), ("cp", self.cp)) if v < 1]
        if not out and self.size != num_devices:
            out.append((f"tp_degree x dp_degree x ep_degree x cp_degree = {self.tp} x {self.dp} x {self.ep} x "
                        f"{self.cp} = {self.size}, but the stage has {num_devices} devices",
                        f"make the degrees multiply to {num_devices} (or omit dp_degree: the devices left)"))
        if self.dp > 1 and self.shard == "none":
            out.append((f"shard is 'none' on a data-parallel group (dp_degree {self.dp}), which always runs "
                        "sharded (FSDP2)", 'set shard = "grads" (ZeRO-2), "optimizer" or "full"'))
        return out
