"""The plan `chipfuse train` makes on its own: unequal data parallelism over the whole pool.

Shares follow each device's speed (declared for emulated devices); micro-batches follow its
memory as the planner's one memory model predicts it (plan/memory.py: the model `chipfuse plan`
searches with and the launcher checks every plan against), with gradient accumulation where a
share does not fit at once. Nothing is measured: no model is built to size a plan."""

from __future__ import annotations

from chipfuse.cluster.pool import Device, Pool
from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.memory import plan_memory
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.plan.shares import even_shares, proportional_shares


def unequal_data_parallel(pool: Pool, model: ModelSpec, *, global_batch: int, seq_len: int,
                          preferred_micro_batch: int = 8, even: bool = False) -> Plan:
    """One whole-model replica per device; `even=True` gives the simple even split for comparison."""
    names = [d.name for d in pool.devices]
    if even:
        shares = even_shares(names, global_batch)
    else:
        shares = proportional_shares({d.name: d.emulation.speed if d.emulation else 1.0 for d in pool.devices},
                                     global_batch)
    replicas = tuple(fitting_replica(pool, model, d, share=shares[d.name], seq_len=seq_len,
                                     preferred_micro_batch=preferred_micro_batch) for d in pool.devices)
    return Plan(model=model, global_batch=global_batch, seq_len=seq_len, replicas=replicas,
                strategy="even" if even else "proportional-dp", pool=pool.name)


def fitting_replica(pool: Pool, model: ModelSpec, device: Device, *, share: int, seq_len: int,
                    preferred_micro_batch: int) -> Replica:
    """The whole model on `device` with the largest micro-batch, up to the preferred one and the
    share, whose predicted peak fits; refuses, naming the device, when not even one sample does."""
    stage = Stage(devices=(device.name,), first_layer=0, num_layers=model.num_layers)
    largest = max(1, min(preferred_micro_batch, share or preferred_micro_batch))
    for mbs in range(largest, 0, -1):
        rep = Replica(stages=(stage,), batch_share=share, micro_batch_size=mbs)
        alone = Plan(model=model, global_batch=max(1, share), seq_len=seq_len, replicas=(rep,), pool=pool.name)
        (mem,) = plan_memory(alone, pool)
        if mem.missing_bytes <= 0:
            return rep
    MiB = 2**20
    raise PlanError(f"device {device.name!r}: the whole model ({model.name}) needs {mem.peak_bytes / MiB:.1f} MiB "
                    f"with one sample per micro-batch, the device has {mem.capacity_bytes / MiB:.1f} MiB "
                    f"(largest term: {mem.limit}). Fix: use a smaller model, or plan with `chipfuse plan` (sharding, "
                    "checkpointing, pipeline stages)")

