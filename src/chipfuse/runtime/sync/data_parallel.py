"""Unequal data parallelism: each rank computes its own share of every global batch.

Exactness without weights in the reduction: every rank divides its summed token loss by the
GLOBAL token count, so the plain SUM all-reduce of gradients is the gradient of the global mean
loss, whatever the shares (a share-weighted average of per-rank means, computed in one pass).
Written by hand because DDP assumes equal shares; the reduction itself is one c10d all_reduce
over a flat buffer per dtype (torch's own coalescing utilities)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from chipfuse.devices import BRIDGE, CPU


def all_reduce_gradients(params: list[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """SUM-reduce gradients in one flat buffer per dtype (ranks with no share contribute zeros)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        if flat.device.type != CPU and dist.get_backend(group) == BRIDGE:
            # The bridge between chip kinds: gloo reaches every device through host memory.
            host = flat.cpu()
            dist.all_reduce(host, group=group)
            flat.copy_(host)
        else:
            dist.all_reduce(flat, group=group)
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(r)
