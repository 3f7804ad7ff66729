"""The training loop: one worker and one loop for every plan (a data-parallel replica is a
pipeline of one stage). It only reads the plan; the worker (runtime/parallel/pipeline.py) is built from it by
functions, the topology (runtime/parallel/topology.py) validates it and owns the process groups.

Every feature holds for every plan: checkpoints and resume, the NaN policy (a non-finite loss skips
the update on every rank), online rebalancing of replica shares, memory strategies, optimizer and
compute dtypes, DiLoCo islands (of one-device replicas or pipelines), pacing of emulated devices, and the summary
with fusion efficiency."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.cluster.pool import Device, Pool
from chipfuse.data.loader import DataConfig, open_loader
from chipfuse.plan.plan import Plan
from chipfuse.plan.shares import proportional_shares
from chipfuse.report.figures import checked_fields, checked_ratio
from chipfuse.runtime.endure.endure import Endurance, EndureConfig
from chipfuse.runtime.launch import dist as cfdist
from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig
from chipfuse.runtime.parallel.topology import Topology
from chipfuse.runtime.sync.grad_sync import UnitSync, build_gradient_sync
from chipfuse.runtime.train.evaluate import Validator, progress_suffix
from chipfuse.runtime.train.metrics import StepLog, gather_row
from chipfuse.runtime.train.recipe import Recipe, RecipeStep, recipe_of, unit_owner


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    metrics_path: str | None = None
    """JSON-lines log of every step (rank 0 writes it)."""
    shares: str = "plan"
    """'plan': the plan's shares; 'measured': re-split the batch by speeds measured at start-up
    (whole-model one-device replicas only)."""
    solo_samples: int = 8
    """0 skips the start-up measurement of each device alone (no pacing, no fusion efficiency)."""
    slack: float = 1.1
    """Emulated devices pad each micro-batch to slack x solo time / speed (torch-on-cpu.md)."""
    progress: bool = True
    profile_path: str | None = None
    """A `chipfuse profile` JSON: workers pace emulated devices to its per-block times."""
    init_from: str | None = None
    """A Hugging Face folder each rank loads its own tensors from (chipfuse.model.weights)."""
    device: str | None = None
    """This worker's device name; None = the plan's device at this rank (single host)."""
    endure: EndureConfig = field(default_factory=EndureConfig)
    """Checkpoints, resume, NaN policy, clean stop, online rebalancing (runtime/endure/endure.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and the held-out split (data/); default: the built-in corpus."""
    recipe: Recipe | None = None
    """lr schedule, clipping, weight decay (runtime/train/recipe.py); None: constant `lr`, `weight_decay`."""


def _rank_names(name: str, info: cfdist.DistInfo) -> list[str]:
    """Every rank's device name, in rank order (Topology.check refuses duplicates)."""
    names = [name]
    if info.distributed:
        names = [""] * info.world_size
        dist.all_gather_object(names, name)
    return names


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _common_origin() -> float:
    """A shared time origin (rank 0's clock after a barrier): all ranks run on one host here, and
    perf_counter is the same monotonic clock for every process of a host."""
    t = torch.tensor([time.perf_counter()], dtype=torch.float64)
    if dist.is_initialized():
        dist.barrier()
        dist.broadcast(t, src=0)
    return float(t)


def _init_one_process_group() -> None:
    """FSDP2 (parameter offload on a lone device) needs a process group even for one rank."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def run(plan: Plan, pool: Pool, cfg: TrainConfig) -> dict | None:
    """Train `plan` on this rank. Returns the run's summary on rank 0, None elsewhere."""
    # Which device this worker is: given (multi-host: the node's devices by local rank, since c10d
    # rendezvous hands out global ranks in arrival order), or the plan's device at this rank.
    name = cfg.device or plan.devices[int(os.environ.get("RANK", 0))]
    kinds = {cfdist.torch_device_kind(pool.device(d)) for d in plan.devices}
    info = cfdist.init(device_kind=cfdist.torch_device_kind(pool.device(name)),
                       backend=None if len(kinds) == 1 else "gloo")
    by_rank = _rank_names(name, info)
    topo = Topology.of(plan, pool, by_rank)  # the one topology of this worker
    # The plan itself was checked once, by the launcher that resolved the run spec.
    topo.check_ranks(world_size=info.world_size)
    if any(s.offload == "params" for r in plan.replicas for s in r.stages):
        _init_one_process_group()
    # Emulated devices are always paced; solo_samples=0 only leaves fusion efficiency out.
    pace = cfg.solo_samples > 0
    recipe = recipe_of(cfg)
    # The run's batches: refused before any step if the data cannot train this model (chipfuse.data).
    loader = open_loader(cfg.data, global_batch=plan.global_batch, seq_len=plan.seq_len,
                         vocab_size=plan.model.vocab_size, seed=cfg.seed)
    wcfg = WorkerConfig(seed=cfg.seed, data_seed=cfg.seed, lr=recipe.lr, weight_decay=recipe.weight_decay, pace=True,
                        slack=cfg.slack, profile_path=cfg.profile_path, init_from=cfg.init_from)
    worker = PipelineWorker(plan, pool, rank=info.rank, config=wcfg, topology=topo, device=info.device, loader=loader)
    role = worker.role

    shares = dict(plan.shares)
    if cfg.shares == "measured" and topo.replicated_units:
        rates = dict(zip(by_rank, (g[0] for g in _all_gather_floats([worker.whole_stage_tokens_per_s()])),
                         strict=True))
        shares = proportional_shares({d: rates[d] for d in plan.devices}, plan.global_batch)
        start = 0
        for d in plan.devices:
            if d == name:
                worker.set_share(offset=start, share=shares[d])
            start += shares[d]
    endure = Endurance(cfg.endure, plan=plan, rank_names=by_rank, name=name, worker=worker, shares=shares)
    endure.data_position = loader.position  # checkpoints record where training is in the data
    first_step = endure.resume(worker.module, worker.opt, cfg.steps)
    # This step's lr, and clipping by the norm of the fully reduced gradient, each layer counted once.
    recipe_step = RecipeStep(recipe, worker.opt, total_steps=cfg.steps, params=worker.trainable,
                             owns=unit_owner(worker.unit_params, worker.unit_ranks, info.rank, members=role.members))
    # Validation on the held-out split: each replica its share of the set, forward only through the worker.
    validator = Validator(loader, every=cfg.data.eval_every, total_steps=cfg.steps,
                          place=lambda: (worker.offset, worker.share), loss_sum=worker.eval_loss_sum)
    # plan.sync: per-layer sums over replicas, or islands with DiLoCo between them (docs/slow_links.md)
    grad_sync = build_gradient_sync(plan, pool, worker.trainable, rank=info.rank, rank_devices=by_rank,
                                    share_fn=lambda: worker.share, default=UnitSync(worker), worker=worker)
    endure.attach(grad_sync)  # checkpoints keep its state (DiLoCo's outer loop); a resume restores it
    log = StepLog(devices=by_rank, seq_len=plan.seq_len, emulated=pool.emulated, append=first_step > 0,
                  path=Path(cfg.metrics_path) if info.is_main and cfg.metrics_path else None)
    progress = _Progress(enabled=info.is_main and cfg.progress, steps=cfg.steps, devices=list(plan.devices))
    events: list[list[tuple[str, float, float]]] = []
    t_origin = _common_origin()
    step = first_step
    for step in range(first_step, cfg.steps):
        worker.clock.events.clear()
        padded0 = _padded(worker)
        t_step = time.perf_counter()
        worker.opt.zero_grad(set_to_none=True)
        worker.update_meter()  # last step's gradients are freed: the meter must not count them in this one
        local_loss = worker.forward_backward(step)
        t_comm = time.perf_counter()
        grad_sync.reduce()
        comm_s = time.perf_counter() - t_comm
        loss_sum = float(local_loss) * plan.global_batch * plan.seq_len
        t_opt = time.perf_counter()
        recipe_stats = recipe_step.before_update(step)  # collective when clipping
        if endure.before_update(step, loss_sum):  # False: non-finite loss, update skipped on every rank
            worker.opt.step()
        t_outer = time.perf_counter()
        grad_sync.after_step()  # counted even when the update was skipped: islands stay in step
        comm_s += time.perf_counter() - t_outer
        worker.clock.events += [("sync", t_comm, t_opt), ("optimizer", t_opt, t_outer)]
        worker.update_meter()
        events.append([(k, a - t_origin, b - t_origin) for k, a, b in worker.clock.events])
        row = gather_row({
            "loss_sum": loss_sum,
            # samples on the last stage's leader only, so StepLog counts each replica's tokens once
            "samples": worker.share if (role.last and role.leader) else 0,
            "compute_s": t_comm - t_step, "padded_s": _padded(worker) - padded0,
            "comm_s": comm_s, "step_s": time.perf_counter() - t_step})
        extra = endure.after_step(step, row)
        extra |= recipe_stats | validator.maybe_run(step)  # val loss/ppl when due (collective)
        if info.is_main:
            progress.update(log.add(step, row, **extra))
        if endure.stopping:
            break
    grad_sync.finish()
    progress.close()
    endure.finish(step + 1)
    ranks = _gather_objects(worker.describe() | {
        "solo_fwd_s": worker.solo_fwd_s, "solo_bwd_s": worker.solo_bwd_s, "peak_bytes": worker.peak_bytes(),
        "solo_tokens_per_s": worker.whole_stage_tokens_per_s() if pace else None,
        "events": events[-3:] if events else []})
    sync_desc = grad_sync.merged(_gather_objects(grad_sync.describe()))
    if not info.is_main:
        return None
    return _summary(plan, pool, cfg, log, ranks, topo) | {"sync": sync_desc, **endure.summary(),
                                                          "shares": endure.shares, "data": loader.describe(),
                                                          **recipe_step.summary(), **validator.summary()}


def _all_gather_floats(values: list[float]) -> list[list[float]]:
    t = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _padded(worker: PipelineWorker) -> float:
    c = worker.clock
    return (c.fwd.padded_s if c.fwd else 0.0) + (c.bwd.padded_s if c.bwd else 0.0)


def _summary(plan: Plan, pool: Pool, cfg: TrainConfig, log: StepLog, ranks: list[dict], topo: Topology) -> dict:
    step_s = log.steady_step_s()
    tps = log.steady_tokens_per_s()
    steady = log.rows[2:] or log.rows
    devices = {}
    for r, d in zip(topo.roles, ranks, strict=True):
        dev = pool.device(r.device)
        rep = plan.replicas[r.replica]
        compute = sum(row["devices"][r.device]["compute_s"] for row in steady)
        devices[r.device] = {
            "chip": dev.chip.name, "speed": _speed(dev), "torch_device": d["torch_device"],
            "replica": r.replica, "stage": r.stage_index, "layers": d["layers"], "group": d["group"],
            "group_kind": d["group_kind"], "applied": d["applied"], "optimizer": d["optimizer"],
            "schedule": d["schedule"], "schedule_note": d["schedule_note"],
            "solo_fwd_s": d["solo_fwd_s"], "solo_bwd_s": d["solo_bwd_s"], "peak_bytes": d["peak_bytes"],
            # every stage of a replica sees every token of the replica's share
            "tokens_per_s": rep.batch_share * plan.seq_len * len(steady) / compute if compute > 0 else 0.0,
            "wait_s_mean": sum(row["devices"][r.device]["wait_s"] for row in steady) / len(steady),
        }
    solo = {r.device: d["solo_tokens_per_s"] for r, d in zip(topo.roles, ranks, strict=True)}
    solo_sum = sum(v for v in solo.values() if v) if all(solo.values()) else 0.0
    return {
        "emulated": pool.emulated,
        "pool": pool.name,
        "model": plan.model.name,
        "num_params": _num_params(topo, ranks),
        "num_trainable_params": sum(d["num_trainable_params"] for r, d in zip(topo.roles, ranks, strict=True)
                                    if r.replica == 0 and r.leader),
        "freeze": list(plan.freeze),
        "strategy": plan.strategy,
        "schedule": plan.schedule,
        "steps": cfg.steps,
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "micro_batch_size": {r.devices[0]: r.micro_batch_size for r in plan.replicas},
        "stages": [[{"devices": list(s.devices), "device": s.devices[0], "tp_degree": s.tp_degree,
                     "layers": [s.first_layer, s.first_layer + s.num_layers]} for s in r.stages]
                   for r in plan.replicas],
        "initial_loss": log.rows[0]["loss"],
        "final_loss": log.rows[-1]["loss"],
        "losses": [row["loss"] for row in log.rows],
        "tokens_per_s": tps,
        "measured_step_s": step_s,
        "step_s": [row["step_s"] for row in log.rows],
        # A device that holds a stage is credited with the whole model at its measured per-layer rate.
        "solo_tokens_per_s": solo,
        **(checked_fields("fusion_efficiency", checked_ratio(tps, solo_sum, hi=1.0, what="fusion efficiency",
                                                             why="a job cannot outrun its devices alone"))
           if cfg.solo_samples > 0 else {"fusion_efficiency": None,
                                         "fusion_efficiency_fault": "not measured (--solo-samples 0)"}),
        "devices": devices,
        "timeline": {r.device: ranks[r.rank]["events"] for r in topo.roles},
        "metrics_path": cfg.metrics_path,
    }


def _num_params(topo: Topology, ranks: list[dict]) -> int:
    """One replica's parameters, each counted once: one leader per stage group (DTensor numel is the
    whole tensor's), and a tied embedding/head matrix that spans two stages only on the first."""
    return sum(d["num_params"] - (d["tied_params"] if r.last and not r.first else 0)
               for r, d in zip(topo.roles, ranks, strict=True) if r.replica == 0 and r.leader)


def _speed(device: Device) -> float | None:
    return device.emulation.speed if device.emulation else None


class _Progress:
    """A rich progress bar with loss and tokens/s per device (rank 0 only)."""

    def __init__(self, *, enabled: bool, steps: int, devices: list[str]):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), transient=False)
        self.task = self.bar.add_task("", total=steps)
        self.bar.start()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        per = " ".join(f"{d} {v['tokens_per_s'] / 1e3:.1f}k" for d, v in row["devices"].items())
        self.bar.update(self.task, advance=1,
                        description=f"loss {row['loss']:.3f}{progress_suffix(row)} | "
                                    f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | {per}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
