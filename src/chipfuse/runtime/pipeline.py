"""The worker for one rank of a plan whose replicas are pipelines of unequal stages.

Stages run on torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B) with
hand-built stage modules (runtime/stages.py). Written by hand here, the heterogeneity:
- each replica is its own pipeline group, with its own share of the batch and micro-batch size;
  a short last micro-batch is padded with ignored targets so all micro-batches have one shape;
- the loss is the summed token cross-entropy over the GLOBAL token count, and the schedule does
  not rescale gradients, so the sum of every replica's gradient is exactly the global-batch mean
  gradient whatever the shares;
- gradients of each layer are summed among the ranks that hold it (one per replica), grouped by
  identical rank sets, through vendor groups and a bridge (runtime/groups.py);
- every micro-batch's forward and backward is paced to the emulated device's speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from chipfuse.data import get_batch
from chipfuse.model.gpt import loss_sum
from chipfuse.plan.plan import Plan
from chipfuse.runtime.emulate import MemoryMeter, Pacer, model_state_tensors
from chipfuse.runtime.groups import Reducer, link_backend, make_reducer
from chipfuse.runtime.layout import layout, schedule_for, unit_ranks, units_of_model
from chipfuse.runtime.optim import build_optimizer
from chipfuse.runtime.paced import Clock, PacedStage, measure_solo
from chipfuse.runtime.stages import build_stage

IGNORE = -100  # F.cross_entropy's ignore_index: padded samples add nothing to loss or gradients


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    seed: int = 0
    """Weights: every rank builds the full model with this seed, then keeps its stage."""
    data_seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    pace: bool = True
    """Pace emulated devices to their speed (off for parity tests: it changes no number)."""
    slack: float = 1.1
    memory_caps: bool = True
    profile_path: str | None = None
    """Pace emulated devices to this profile's per-block times (the chip the planner predicted
    for) instead of `slack x solo / speed` measured at start-up."""
    init_from: str | None = None
    """A Hugging Face folder: each rank loads only its stage's tensors from its safetensors."""


class PipelineWorker:
    """One rank. Construction is collective: every rank of the job must build its worker."""

    def __init__(self, plan: Plan, pool: Any, *, rank: int, config: WorkerConfig = WorkerConfig(),
                 by_rank: list[str] | None = None):
        self.plan, self.cfg, self.rank = plan, config, rank
        roles = layout(plan, by_rank)
        self.role = role = roles[rank]
        self.replica = rep = plan.replicas[role.replica]
        self.device = pool.device(role.device)
        self.stage_plan = rep.stages[role.stage_index]
        native_of = {d.vendor: d.backend for d in pool.devices}
        vendor_of = {r.rank: pool.device(r.device).vendor for r in roles}

        # Groups, created on every rank in one order: pipelines by replica, then reducers.
        self.pp_group = None
        for i in range(len(plan.replicas)):
            ranks = sorted(x.rank for x in roles if x.replica == i)
            if len(ranks) > 1:
                g = dist.new_group(ranks, backend=link_backend({vendor_of[x] for x in ranks}, native_of))
                if rank in ranks:
                    self.pp_group = g
        self.unit_ranks = unit_ranks(plan, by_rank)
        self.reducers: dict[tuple[int, ...], Reducer] = {}
        for s in sorted({v for v in self.unit_ranks.values() if len(v) > 1}):
            red = make_reducer(s, vendor_of, native_of)
            if rank in s:
                self.reducers[s] = red

        # Built on the meta device, this stage's tensors only (chipfuse.model.split).
        self.module = build_stage(plan.model, rep.stages, role.stage_index, seed=config.seed,
                                  init_from=config.init_from)
        self.unit_params = {u: [dict(self.module.named_parameters())[n] for n in names]
                            for u, names in self.module.units().items()}
        self.opt = build_optimizer(self.module.parameters(), plan, lr=config.lr, weight_decay=config.weight_decay)
        self.global_tokens = plan.global_batch * plan.seq_len
        self.offset = sum(r.batch_share for r in plan.replicas[: role.replica])
        self.n_mb = max(1, rep.num_micro_batches)
        emu = self.device.emulation
        self.meter = MemoryMeter(device_name=self.device.name,
                                 cap_bytes=emu.memory_bytes if (emu and config.memory_caps) else None)
        self.meter.set_static(model_state_tensors(self.module, None), what="parameters")
        self.clock = Clock(fwd=None, bwd=None)
        self.solo_fwd_s = self.solo_bwd_s = 0.0
        if config.pace:  # collective (barriers): every rank takes part, paced or not
            fwd_s, bwd_s = self._solo_times()
            self.solo_fwd_s, self.solo_bwd_s = fwd_s, bwd_s
        targets = None
        if config.pace and emu is not None and config.profile_path:
            from chipfuse.runtime.profiler import stage_targets

            targets = stage_targets(config.profile_path, self.device.name, self.stage_plan, last=role.last,
                                    micro_batch_size=rep.micro_batch_size, seq_len=plan.seq_len)
        if targets is not None:
            self.clock = Clock(fwd=Pacer(speed=1.0, unit_s=targets[0], slack=1.0),
                               bwd=Pacer(speed=1.0, unit_s=targets[1], slack=1.0))
        elif config.pace and emu is not None:
            self.clock = Clock(fwd=Pacer(speed=emu.speed, unit_s=self.solo_fwd_s, slack=config.slack),
                               bwd=Pacer(speed=emu.speed, unit_s=self.solo_bwd_s, slack=config.slack))
        self.paced = PacedStage(self.module, self.clock)
        self.schedule_name, self.schedule_note = schedule_for(plan, role.num_stages, self.n_mb)
        self.schedule = self._make_schedule()

    # ------------------------------------------------------------------ set-up helpers
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_sum(logits, targets) / self.global_tokens

    def _example(self) -> torch.Tensor:
        mbs, T = self.replica.micro_batch_size, self.plan.seq_len
        if self.role.first:
            return torch.randint(0, self.plan.model.vocab_size, (mbs, T))
        return torch.randn(mbs, T, self.plan.model.dim)

    def _solo_times(self) -> tuple[float, float]:
        """Forward and backward seconds of one micro-batch, measured one rank at a time so that
        each is measured alone on the machine (the others wait in a barrier)."""
        x = self._example()
        tgt = torch.randint(0, self.plan.model.vocab_size, (x.shape[0], self.plan.seq_len))

        def backward(y: torch.Tensor) -> None:
            if self.role.last:
                self._loss(y, tgt).backward()
            else:
                y.backward(torch.randn_like(y))

        times = (0.0, 0.0)
        for r in range(dist.get_world_size() if dist.is_initialized() else 1):
            if r == self.rank:
                times = measure_solo(self.module, x, backward)
            if dist.is_initialized():
                dist.barrier()
        return times

    def _make_schedule(self) -> Any:
        if self.schedule_name == "local":
            return None
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(self.paced, self.role.stage_index, self.role.num_stages, torch.device("cpu"),
                              group=self.pp_group)
        # Stage j lives on the j-th device of the replica, whose place in the group (ranks sorted)
        # need not be j when the launcher handed out ranks (multi-host).
        members = sorted(self.role.pipeline_ranks)
        stage.stage_index_to_group_rank = {j: members.index(r) for j, r in enumerate(self.role.pipeline_ranks)}
        cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
        # scale_grads=False: the loss is already divided by the global token count.
        return cls(stage, n_microbatches=self.n_mb, loss_fn=self._loss, scale_grads=False)

    # ------------------------------------------------------------------ one step
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's samples of global step `step`, padded to n_mb full micro-batches."""
        rep, T = self.replica, self.plan.seq_len
        x, y = get_batch(step, self.plan.global_batch, T, start=self.offset, count=rep.batch_share,
                         seed=self.cfg.data_seed)
        pad = self.n_mb * rep.micro_batch_size - rep.batch_share
        if pad:
            x = torch.cat([x, torch.zeros(pad, T, dtype=x.dtype)])
            y = torch.cat([y, torch.full((pad, T), IGNORE, dtype=y.dtype)])
        return x, y

    def forward_backward(self, step: int) -> torch.Tensor:
        """Gradients of this rank's stage for its replica's share; returns the summed scaled loss
        of this rank's micro-batches (nonzero on last stages only)."""
        x, y = self.batch(step)
        losses: list[torch.Tensor] = []
        with self.meter.track():
            if self.schedule is None:
                for xm, ym in zip(x.split(self.replica.micro_batch_size), y.split(self.replica.micro_batch_size),
                                  strict=True):
                    loss = self._loss(self.paced(xm), ym)
                    loss.backward()
                    losses.append(loss.detach())
            elif self.role.first:
                self.schedule.step(x)
            elif self.role.last:
                self.schedule.step(target=y, losses=losses)
            else:
                self.schedule.step()
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def reduce_grads(self) -> None:
        """Sum each layer's gradient over the ranks that hold it (one per replica)."""
        for ranks, reducer in self.reducers.items():
            params = [p for u in units_of_model(self.plan.model) if self.unit_ranks[u] == ranks
                      for p in self.unit_params[u]]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = _flatten_dense_tensors(grads)
            reducer.all_reduce(flat)
            for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
                p.grad = g

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step. Returns the global mean loss (on every rank) and timings."""
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        local_loss = self.forward_backward(step)
        t1 = time.perf_counter()
        self.reduce_grads()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        self.clock.events += [("sync", t1, t2), ("optimizer", t2, t3)]
        # offload="optimizer": AdamW's state lives in host memory, not on the device
        on_device_opt = None if self.stage_plan.offload == "optimizer" else self.opt
        self.meter.set_static(model_state_tensors(self.module, on_device_opt), what="model state")
        loss = local_loss.clone()
        if dist.is_initialized():
            dist.all_reduce(loss)  # the last stage of every replica holds a part of the global loss
        return {"loss": loss.item(), "loss_local": local_loss.item(), "step_s": time.perf_counter() - t0, "compute_s": t1 - t0,
                "reduce_s": t2 - t1, "peak_bytes": float(self.meter.peak_bytes)}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in self.module.named_parameters()}

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "device": self.device.name, "replica": self.role.replica,
                "stage": self.role.stage_index, "num_stages": self.role.num_stages,
                "layers": list(self.replica.stages[self.role.stage_index].layers),
                "num_params": sum(p.numel() for p in self.module.parameters()),
                "schedule": self.schedule_name, "schedule_note": self.schedule_note,
                "reducers": [r.describe() for r in self.reducers.values()]}
