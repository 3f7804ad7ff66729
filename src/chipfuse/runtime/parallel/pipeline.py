"""The worker for one rank of ANY plan. A data-parallel replica is a pipeline of one stage; a stage
is a group of one or more devices (runtime/parallel/topology.py). Built, in order:

1. the stage module, cut from the model by layer (model/split.py), on the rank's device, then changed
   by the plan's converters (model/converters: frozen units);
2. the parallelisms in their one order (runtime/parallel/parallelize.py: tensor parallel, checkpointing,
   FSDP2, compute dtype) and the optimizer the plan's state dtype and offload ask for;
3. pacing to the emulated device's speed per micro-batch (runtime/emulate/paced.py) and the memory meter
   (emulated devices; real chips report their allocator's peak);
4. how it meets the other stages: the local micro-batch loop (one-stage replica) or
   torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B) among the stage
   groups' leaders; the other members of a group follow their leader (runtime/parallel/group.py).

Written by hand here, the heterogeneity:
- each replica computes its own share of every global batch in its own micro-batch size; a short
  last micro-batch is padded with ignored targets so all micro-batches have one shape;
- the loss is the summed token cross-entropy over the GLOBAL token count and the schedule does not
  rescale gradients, so the sum of every replica's gradient is exactly the global-batch mean
  gradient whatever the shares;
- gradients of each layer are summed among the replicas holding it, whatever their group sizes
  (runtime/sync/grad_sync.py: UnitSync).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from chipfuse.data.loader import Loader, builtin_loader
from chipfuse.model.build import build_stage
from chipfuse.model.converters import apply_converters
from chipfuse.model.gpt import loss_sum
from chipfuse.model.split import TIED_UNIT
from chipfuse.plan.plan import Plan
from chipfuse.runtime.emulate.device import MemoryMeter, Pacer
from chipfuse.runtime.emulate.paced import Clock, PacedStage, measure_solo
from chipfuse.runtime.parallel.group import GroupStage
from chipfuse.runtime.parallel.memory import (
    build_plan_optimizer,
    device_memory_config,
    device_state_tensors,
    watch_gathered,
)
from chipfuse.runtime.parallel.parallelize import local_full_grads, parallelize
from chipfuse.runtime.parallel.topology import Groups, Topology, schedule_for

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


class _StageIO(nn.Module):
    """Where a stage meets its neighbours: fp32 at the boundary (so pipelining's buffers have one
    declared dtype whatever autocast computes inside), and host memory when the pipeline's group is
    gloo and the stage computes on an accelerator (activations between chips of different kinds)."""

    def __init__(self, run: nn.Module, compute: torch.device):
        super().__init__()
        self.run = run
        self.compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        io = x.device
        y = self.run(x.to(self.compute))
        if y.is_floating_point() and y.dtype != torch.float32:
            y = y.float()
        return y.to(io)


class PipelineWorker:
    """One rank. Construction is collective: every rank of the job must build its worker."""

    def __init__(self, plan: Plan, pool: Any, *, rank: int, config: WorkerConfig = WorkerConfig(),
                 by_rank: list[str] | None = None, topology: Topology | None = None,
                 device: torch.device | None = None, loader: Loader | None = None):
        self.plan, self.cfg, self.rank = plan, config, rank
        # Where samples come from (chipfuse.data); default: the built-in corpus.
        self.loader = loader or builtin_loader(plan.global_batch, plan.seq_len, config.data_seed)
        self.topology = topo = topology or Topology.of(plan, pool, by_rank)
        self.groups: Groups = topo.create_groups(rank)
        self.role = role = topo.role(rank)
        self.replica = rep = plan.replicas[role.replica]
        self.device = pool.device(role.device)
        self.torch_device = device or torch.device("cpu")
        self.stage_plan = topo.stage_of(role)
        self.unit_ranks = topo.unit_ranks()

        # Built on the meta device, then only this stage's tensors on this rank's device
        # (chipfuse.model.split), loaded from init_from when given.
        module = build_stage(plan.model, rep.stages, role.stage_index, seed=config.seed, init_from=config.init_from,
                             device=self.torch_device)
        apply_converters(module, plan)
        self.mem = device_memory_config(plan, pool, role.device)
        self.applied = parallelize(module, self.mem, dims=self.stage_plan.dims, model=plan.model, mesh=self.groups.mesh,
                                   device_type=self.torch_device.type)
        self.module = module
        # Only trainable parameters are summed over replicas, clipped and handed to the optimizer:
        # a frozen one has no gradient, no traffic and no optimizer state.
        self.unit_params = {u: [p for n, p in module.named_parameters() if n in set(names) and p.requires_grad]
                            for u, names in module.units().items()}
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.opt = build_plan_optimizer(self.trainable, self.mem, plan=plan, lr=config.lr,
                                        weight_decay=config.weight_decay)
        self.global_tokens = plan.global_batch * plan.seq_len
        self.offset = sum(r.batch_share for r in plan.replicas[: role.replica])
        self.share = rep.batch_share
        emu = self.device.emulation
        self.meter = MemoryMeter(device_name=self.device.name,
                                 cap_bytes=emu.memory_bytes if (emu and config.memory_caps) else None)
        self.meter.set_static(self._state(None), what="parameters")
        if self.applied.fsdp:
            watch_gathered(module, self.meter)
        self.clock = Clock(fwd=None, bwd=None)
        self.solo_fwd_s = self.solo_bwd_s = 0.0
        if config.pace:  # collective (barriers): every rank takes part, paced or not
            self.solo_fwd_s, self.solo_bwd_s = self._solo_times()
        targets = None
        if config.pace and emu is not None and config.profile_path:
            from chipfuse.runtime.measure.profiler import stage_targets

            targets = stage_targets(config.profile_path, self.device.name, self.stage_plan, last=role.last,
                                    micro_batch_size=rep.micro_batch_size, seq_len=plan.seq_len)
        if targets is not None:
            self.clock = Clock(fwd=Pacer(speed=1.0, unit_s=targets[0], slack=1.0),
                               bwd=Pacer(speed=1.0, unit_s=targets[1], slack=1.0))
        elif config.pace and emu is not None:
            self.clock = Clock(fwd=Pacer(speed=emu.speed, unit_s=self.solo_fwd_s, slack=config.slack),
                               bwd=Pacer(speed=emu.speed, unit_s=self.solo_bwd_s, slack=config.slack))
        self.clock.rows = self._rows()
        self.paced = PacedStage(module, self.clock)
        self.group_stage: GroupStage | None = None
        runner: nn.Module = self.paced
        if role.group_size > 1:
            self.group_stage = GroupStage(self.paced, members=role.members, split=role.kind == "fsdp",
                                          group=self.groups.stage, input_grads=not role.first)
            runner = self.group_stage
        self._runner = runner
        self._build_schedule()

    # ------------------------------------------------------------------ set-up helpers
    @property
    def n_mb(self) -> int:
        return max(1, math.ceil(self.share / self.replica.micro_batch_size))

    @property
    def replica_key(self) -> str:
        """The replica's first device: the name its share goes by (runtime.endure.endure rebalancing)."""
        return self.replica.devices[0]

    def _state(self, opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        return device_state_tensors(self.module, opt, offload=self.mem.offload)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_sum(logits, targets) / self.global_tokens

    def _rows(self) -> int:
        """Samples this rank computes per micro-batch: a sharded group splits them by rows."""
        mbs, role = self.replica.micro_batch_size, self.role
        if role.kind != "fsdp":
            return mbs
        return len(range(role.group_index, mbs, role.group_size))

    def _example(self) -> torch.Tensor:
        n, T = self._rows(), self.plan.seq_len
        if self.role.first:
            return torch.randint(0, self.plan.model.vocab_size, (n, T), device=self.torch_device)
        return torch.randn(n, T, self.plan.model.dim, device=self.torch_device)

    def _solo_times(self) -> tuple[float, float]:
        """Forward and backward seconds of one micro-batch, measured one stage group at a time so
        that each is measured alone on the machine (the others wait in a barrier)."""
        x = self._example()
        tgt = torch.randint(0, self.plan.model.vocab_size, (x.shape[0], self.plan.seq_len), device=self.torch_device)

        def backward(y: torch.Tensor) -> None:
            if self.role.last:
                self._loss(y, tgt).backward()
            else:
                y.backward(torch.randn_like(y))

        times = (0.0, 0.0)
        turns = sorted({r.members for r in self.topology.roles})
        for members in turns:
            if self.rank in members:
                times = measure_solo(self.module, x, backward)
            if dist.is_initialized():
                dist.barrier()
        self.opt.zero_grad(set_to_none=True)
        return times

    def _build_schedule(self) -> None:
        role = self.role
        self.schedule_name, self.schedule_note = schedule_for(self.plan, role.num_stages, self.n_mb)
        self.schedule: Any = None
        if self.schedule_name == "local" or not role.leader:
            return
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        # gloo carries host tensors only: a stage on an accelerator meets its gloo neighbours in host memory.
        io = self.torch_device
        if io.type != "cpu" and dist.get_backend(self.groups.pipeline) == "gloo":
            io = torch.device("cpu")
        mbs, T, C = self.replica.micro_batch_size, self.plan.seq_len, self.plan.model.dim
        # requires_grad: hidden states carry gradients back between stages (token ids do not).
        x_meta = (torch.zeros(mbs, T, dtype=torch.long, device=io) if role.first
                  else torch.zeros(mbs, T, C, device=io, requires_grad=True))
        y_meta = torch.zeros(mbs, T, self.plan.model.vocab_size if role.last else C, device=io, requires_grad=True)
        # Shapes and dtypes declared, so pipelining runs no extra forward to infer them (which a
        # stage group's followers would not mirror).
        stage = PipelineStage(_StageIO(self._runner, self.torch_device), role.stage_index, role.num_stages, io,
                              input_args=x_meta, output_args=y_meta, group=self.groups.pipeline)
        # Stage j lives on the j-th leader of the replica, whose place in the group (ranks sorted)
        # need not be j when the launcher handed out ranks (multi-host).
        members = sorted(role.pipeline_ranks)
        stage.stage_index_to_group_rank = {j: members.index(r) for j, r in enumerate(role.pipeline_ranks)}
        cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
        # scale_grads=False: the loss is already divided by the global token count.
        self.schedule = cls(stage, n_microbatches=self.n_mb, loss_fn=self._loss, scale_grads=False)
        self._io = io

    def set_share(self, *, offset: int, share: int) -> None:
        """Online rebalancing: this replica computes another slice of the batch from the next step
        (every rank of the replica is told; a changed micro-batch count rebuilds the schedule)."""
        before = self.n_mb
        self.offset, self.share = offset, share
        if self.n_mb != before:
            self._build_schedule()

    # ------------------------------------------------------------------ one step
    def _pad(self, x: torch.Tensor, y: torch.Tensor, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples padded to n_mb full micro-batches, the padding's targets ignored (pipelines need
        one shape; a one-stage replica computes its short last micro-batch as it is)."""
        T = self.plan.seq_len
        n_pad = self.n_mb * self.replica.micro_batch_size - x.shape[0] if pad else 0
        if n_pad > 0:
            x = torch.cat([x, torch.zeros(n_pad, T, dtype=x.dtype)])
            y = torch.cat([y, torch.full((n_pad, T), IGNORE, dtype=y.dtype)])
        return x, y

    def batch(self, step: int, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's samples of global step `step` (padded: see _pad)."""
        return self._pad(*self.loader.batch(step, self.offset, self.share), pad=pad)

    def _val_batch(self, start: int, count: int, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pad(*self.loader.val_batch(start, count), pad=pad)

    def forward_backward(self, step: int) -> torch.Tensor:
        """Gradients of this rank's stage for its replica's share; returns the summed scaled loss
        of this rank's micro-batches (nonzero on the last stage's leader only)."""
        return self._run(functools.partial(self.batch, step), train=True)

    def eval_loss_sum(self, start: int, count: int) -> float:
        """The summed token loss of validation samples [start, start+count) (runtime/train/evaluate.py):
        forward only, through the path training takes (local loop or schedule, stage-group followers
        serving their leader), in calls of the replica's n_mb micro-batches (padded as in training).
        Every rank of the replica makes the same calls; nonzero on the last stage's leader only."""
        per_call = self.n_mb * self.replica.micro_batch_size
        total = 0.0
        for a in range(start, start + count, per_call):
            total += float(self._run(functools.partial(self._val_batch, a, min(per_call, start + count - a)),
                                     train=False))
        return total * self.global_tokens  # the loss is scaled by the global token count: undo it

    def _run(self, fetch: Callable[[bool], tuple[torch.Tensor, torch.Tensor]], *, train: bool) -> torch.Tensor:
        """One pass over n_mb micro-batches (`fetch(pad)` gives them, on the leader): forward and backward
        when training, forward only without autograd otherwise. Returns the summed scaled loss."""
        losses: list[torch.Tensor] = []
        role = self.role
        with self.meter.track(), torch.set_grad_enabled(train):
            if not role.leader:
                assert self.group_stage is not None
                self.group_stage.follow()
                return torch.zeros(())
            # Padding only where shapes must agree: pipelines, and a sharded group's row split.
            x, y = fetch(self.schedule is not None or role.kind == "fsdp")
            if self.schedule is None:
                x, y = x.to(self.torch_device), y.to(self.torch_device)
                mbs = self.replica.micro_batch_size
                for xm, ym in zip(x.split(mbs), y.split(mbs), strict=True):
                    loss = self._loss(self._runner(xm), ym)
                    if train:
                        loss.backward()
                    losses.append(loss.detach().float().cpu())
            else:
                run = self.schedule.step if train else self.schedule.eval
                if role.first:
                    run(x.to(self._io))
                elif role.last:
                    run(target=y.to(self._io), losses=losses)
                else:
                    run()
            if self.group_stage is not None:
                self.group_stage.end()
        self._sync_device()
        return torch.stack([loss.detach().float().cpu() for loss in losses]).sum() if losses else torch.zeros(())

    def _sync_device(self) -> None:
        if self.torch_device.type != "cpu":
            torch.accelerator.synchronize(self.torch_device)

    def step(self, step: int, sync: Any = None) -> dict[str, float]:
        """One optimizer step (tests and benchmarks; the training loop calls the pieces). Returns the
        global mean loss (on every rank) and timings."""
        from chipfuse.runtime.sync.grad_sync import UnitSync

        sync = sync or UnitSync(self)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.update_meter()  # last step's gradients are freed: the meter must not count them in this one
        local_loss = self.forward_backward(step)
        t1 = time.perf_counter()
        sync.reduce()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        self.clock.events += [("sync", t1, t2), ("optimizer", t2, t3)]
        self.update_meter()
        loss = local_loss.clone()
        if dist.is_initialized():
            dist.all_reduce(loss)  # the last stage of every replica holds a part of the global loss
        return {"loss": loss.item(), "loss_local": local_loss.item(), "step_s": time.perf_counter() - t0,
                "compute_s": t1 - t0, "reduce_s": t2 - t1, "peak_bytes": float(self.peak_bytes())}

    def reduce_grads(self) -> None:
        from chipfuse.runtime.sync.grad_sync import UnitSync

        UnitSync(self).reduce()

    def update_meter(self) -> None:
        self.meter.set_static(self._state(self.opt), what="parameters, gradients and optimizer state")

    def peak_bytes(self) -> int:
        """Peak device memory: the emulated meter's count, or the chip allocator's for a real chip."""
        if self.torch_device.type != "cpu" and hasattr(torch.accelerator, "max_memory_allocated"):
            return int(torch.accelerator.max_memory_allocated(self.torch_device))
        return int(self.meter.peak_bytes)

    def grads(self) -> dict[str, torch.Tensor]:
        """Whole gradients by the unwrapped model's names (collective inside a stage group)."""
        return local_full_grads(self.module)

    def whole_stage_tokens_per_s(self) -> float:
        """This device's standalone throughput on the whole model, from its stage's solo (or paced)
        times: per-layer time x the model's layers. Exact for a one-stage replica of one device."""
        fwd = self.clock.fwd.target_s(1) if self.clock.fwd else self.solo_fwd_s
        bwd = self.clock.bwd.target_s(1) if self.clock.bwd else self.solo_bwd_s
        if fwd + bwd <= 0:
            return 0.0
        rows = self._rows() * (self.role.group_size if self.role.kind == "tp" else 1)
        per_sample_stage = (fwd + bwd) / max(1, rows)
        if self.role.kind == "tp":  # a member alone would carry the whole group's width
            per_sample_stage *= self.role.group_size
        scale = self.plan.model.num_layers / self.stage_plan.num_layers
        return self.plan.seq_len / (per_sample_stage * scale)

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "device": self.device.name, "replica": self.role.replica,
                "stage": self.role.stage_index, "num_stages": self.role.num_stages,
                "group": list(self.role.members), "group_kind": self.role.kind,
                "torch_device": str(self.torch_device),
                "layers": list(self.stage_plan.layers),
                "num_params": sum(p.numel() for p in self.module.parameters()),
                "num_trainable_params": sum(p.numel() for p in self.trainable),
                # the head's copy of a tied matrix: the summary counts the matrix once (trainer._num_params)
                "tied_params": sum(p.numel() for p in self.unit_params.get(TIED_UNIT, [])),
                "schedule": self.schedule_name, "schedule_note": self.schedule_note,
                "applied": self.applied.to_dict(),
                "optimizer": type(self.opt).__name__,
                "reducers": [r.describe() for r in self.groups.reducers.values()]}
