"""The plan `chipfuse train` makes on its own: unequal data parallelism over the whole pool.

Shares follow each device's speed (declared for emulated devices); micro-batches follow its
memory (gradient accumulation where a share does not fit at once)."""

from __future__ import annotations

from chipfuse.cluster.pool import Pool
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.plan.shares import even_shares, max_micro_batch, micro_batches, proportional_shares

ADAMW_STATE_FACTOR = 4
"""fp32 parameter + gradient + two Adam moments, per parameter, in units of parameter bytes."""


def unequal_data_parallel(pool: Pool, model: ModelSpec, *, global_batch: int, seq_len: int,
                          act_bytes_per_sample: int, param_bytes: int, preferred_micro_batch: int = 8,
                          even: bool = False) -> Plan:
    """One whole-model replica per device. `act_bytes_per_sample` and `param_bytes` come from the
    model (measured or modelled); `even=True` gives the simple even split for comparison."""
    names = [d.name for d in pool.devices]
    if even:
        shares = even_shares(names, global_batch)
    else:
        shares = proportional_shares({d.name: d.emulation.speed if d.emulation else 1.0 for d in pool.devices},
                                     global_batch)
    replicas = []
    for d in pool.devices:
        cap = max_micro_batch(memory_bytes=d.memory_bytes, static_bytes=ADAMW_STATE_FACTOR * param_bytes,
                              act_bytes_per_sample=act_bytes_per_sample, device=d.name)
        mbs, _ = micro_batches(shares[d.name], cap, preferred_micro_batch)
        replicas.append(Replica(stages=(Stage(devices=(d.name,), first_layer=0, num_layers=model.num_layers),),
                                batch_share=shares[d.name], micro_batch_size=mbs))
    return Plan(model=model, global_batch=global_batch, seq_len=seq_len, replicas=tuple(replicas),
                strategy="even" if even else "proportional-dp", pool=pool.name)
