"""Unequal data parallelism: each rank computes its own share of every global batch.

Exactness without weights in the reduction: every rank divides its summed token loss by the
GLOBAL token count, so the plain SUM all-reduce of gradients is the gradient of the global mean
loss, whatever the shares (a share-weighted average of per-rank means, computed in one pass).
Written by hand because DDP assumes equal shares; the reduction itself is one c10d all_reduce
over a flat buffer per dtype (torch's own coalescing utilities)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from chipfuse.data.loader import Loader, builtin_loader
from chipfuse.devices import BRIDGE, CPU, synchronize
from chipfuse.model.gpt import loss_sum
from chipfuse.runtime.emulate.device import MemoryMeter, Pacer


@dataclass
class WorkResult:
    """What one rank did in one step."""

    loss_sum: float
    samples: int
    tokens: int
    compute_s: float
    """Wall time of forward and backward, padding included (what the emulated chip would take)."""
    padded_s: float


class DataParallelWorker:
    """One whole-model replica computing `share` samples per step, starting at `offset` in the batch."""

    def __init__(self, *, model: torch.nn.Module, global_batch: int, seq_len: int, offset: int, share: int,
                 micro_batch_size: int, device: torch.device, pacer: Pacer | None = None,
                 meter: MemoryMeter | None = None, seed: int = 0, loader: Loader | None = None):
        self.model = model
        self.global_batch = global_batch
        self.seq_len = seq_len
        self.offset = offset
        self.share = share
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.pacer = pacer
        self.meter = meter
        self.seed = seed
        # Where samples come from (chipfuse.data); default: the built-in corpus.
        self.loader = loader or builtin_loader(global_batch, seq_len, seed)

    def set_share(self, *, offset: int, share: int) -> None:
        """Online rebalancing: the next step computes a different slice of the batch."""
        self.offset, self.share = offset, share

    def micro_batch_forward_backward(self, step: int, start: int, count: int) -> float:
        x, y = self.loader.batch(step, start, count)
        x, y = x.to(self.device), y.to(self.device)
        global_tokens = self.global_batch * self.seq_len
        if self.meter is not None:
            with self.meter.track():
                loss = loss_sum(self.model(x), y)
                (loss / global_tokens).backward()
        else:
            loss = loss_sum(self.model(x), y)
            (loss / global_tokens).backward()
        return float(loss.detach())

    def compute(self, step: int) -> WorkResult:
        """Forward and backward over this rank's share, in micro-batches (gradient accumulation)."""
        t0 = time.perf_counter()
        padded = 0.0
        total = 0.0
        done = 0
        while done < self.share:
            n = min(self.micro_batch_size, self.share - done)
            t_mb = time.perf_counter()
            total += self.micro_batch_forward_backward(step, self.offset + done, n)
            if self.pacer is not None:
                padded += self.pacer.pad(t_mb, n)
            done += n
        synchronize(self.device)
        return WorkResult(loss_sum=total, samples=self.share, tokens=self.share * self.seq_len,
                          compute_s=time.perf_counter() - t0, padded_s=padded)


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
