"""The training loop for plans with pipeline stages: what runtime.trainer.run calls for them.

It keeps the trainer's outputs (metrics.jsonl rows through StepLog, the same summary keys), so
`chipfuse train` prints and writes one format whatever the plan. Per-step values are gathered
from every rank; the loss of a step lives on the last stage of each replica.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.cluster.pool import Pool
from chipfuse.plan.plan import Plan
from chipfuse.runtime import dist as cfdist
from chipfuse.runtime.endure import Endurance
from chipfuse.runtime.layout import layout
from chipfuse.runtime.metrics import StepLog, gather_row
from chipfuse.runtime.pipeline import PipelineWorker, WorkerConfig


def run_pipeline(plan: Plan, pool: Pool, cfg: Any, info: cfdist.DistInfo,
                 by_rank: list[str] | None = None) -> dict | None:
    """Train `plan` (any mix of pipelines and whole-model replicas) on this rank.
    cfg: runtime.trainer.TrainConfig. Returns the summary on rank 0, None elsewhere."""
    wcfg = WorkerConfig(seed=cfg.seed, data_seed=cfg.seed, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        pace=True, slack=cfg.slack, profile_path=cfg.profile_path,
                        init_from=getattr(cfg, "init_from", None))
    worker = PipelineWorker(plan, pool, rank=info.rank, config=wcfg, by_rank=by_rank)
    role = worker.role
    names = list(by_rank) if by_rank is not None else list(plan.devices)
    endure = Endurance(cfg.endure, plan=plan, rank_names=names, name=role.device, worker=worker, shares=plan.shares)
    first_step = endure.resume(worker.module, worker.opt, cfg.steps)
    log = StepLog(devices=names, seq_len=plan.seq_len, emulated=pool.emulated, append=first_step > 0,
                  path=Path(cfg.metrics_path) if info.is_main and cfg.metrics_path else None)
    events: list[list[tuple[str, float, float]]] = []
    t_origin = _common_origin()
    for step in range(first_step, cfg.steps):
        worker.clock.events.clear()
        padded0 = _padded(worker)
        res = worker.step(step)
        endure.after_update(step, res["loss"])
        events.append([(k, a - t_origin, b - t_origin) for k, a, b in worker.clock.events])
        row = gather_row({
            "loss_sum": res["loss_local"] * plan.global_batch * plan.seq_len,
            # samples on the last stage only, so StepLog counts each replica's tokens once
            "samples": worker.replica.batch_share if role.last else 0,
            "compute_s": res["compute_s"], "padded_s": _padded(worker) - padded0,
            "comm_s": res["reduce_s"], "step_s": res["step_s"]})
        extra = endure.after_step(step, row)
        if info.is_main:
            log.add(step, row, **extra)
            if cfg.progress:
                r = log.rows[-1]
                print(f"step {step}: loss {r['loss']:.4f}, {r['step_s'] * 1e3:.0f} ms, "
                      f"{r['tokens_per_s']:.0f} tok/s" + (" (emulated)" if pool.emulated else ""), flush=True)
        if endure.stopping:
            break
    endure.finish(step + 1)
    describe = _gather_objects(worker.describe() | {"solo_fwd_s": worker.solo_fwd_s, "solo_bwd_s": worker.solo_bwd_s,
                                                    "peak_bytes": worker.meter.peak_bytes, "events": events})
    if not info.is_main:
        return None
    return _summary(plan, pool, cfg, log, describe, by_rank) | endure.summary()


def _padded(worker: PipelineWorker) -> float:
    c = worker.clock
    return (c.fwd.padded_s if c.fwd else 0.0) + (c.bwd.padded_s if c.bwd else 0.0)


def _common_origin() -> float:
    """A shared time origin (rank 0's clock after a barrier): all ranks run on one host here, and
    perf_counter is the same monotonic clock for every process of a host."""
    t = torch.tensor([time.perf_counter()], dtype=torch.float64)
    if dist.is_initialized():
        dist.barrier()
        dist.broadcast(t, src=0)
    return float(t)


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _summary(plan: Plan, pool: Pool, cfg: Any, log: StepLog, ranks: list[dict], by_rank: list[str] | None) -> dict:
    roles = layout(plan, by_rank)
    step_s = log.steady_step_s()
    tps = log.steady_tokens_per_s()
    steady = log.rows[2:] or log.rows
    devices = {}
    for r, d in zip(roles, ranks, strict=True):
        dev = pool.device(r.device)
        rep = plan.replicas[r.replica]
        devices[r.device] = {
            "chip": dev.chip.name, "speed": dev.emulation.speed if dev.emulation else None,
            "replica": r.replica, "stage": r.stage_index, "layers": d["layers"],
            "schedule": d["schedule"], "schedule_note": d["schedule_note"],
            "solo_fwd_s": d["solo_fwd_s"], "solo_bwd_s": d["solo_bwd_s"], "peak_bytes": d["peak_bytes"],
            # a stage sees every token of its replica
            "tokens_per_s": rep.batch_share * plan.seq_len / step_s if step_s else 0.0,
            "wait_s_mean": sum(row["devices"][r.device]["wait_s"] for row in steady) / len(steady),
        }
    return {
        "emulated": pool.emulated,
        "pool": pool.name,
        "model": plan.model.name,
        "num_params": sum(d["num_params"] for r, d in zip(roles, ranks, strict=True) if r.replica == 0),
        "strategy": plan.strategy,
        "schedule": plan.schedule,
        "steps": cfg.steps,
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "shares": {r.devices[0]: r.batch_share for r in plan.replicas},
        "micro_batch_size": {r.devices[0]: r.micro_batch_size for r in plan.replicas},
        "stages": [[{"device": s.devices[0], "layers": [s.first_layer, s.first_layer + s.num_layers]}
                    for s in r.stages] for r in plan.replicas],
        "initial_loss": log.rows[0]["loss"],
        "final_loss": log.rows[-1]["loss"],
        "losses": [row["loss"] for row in log.rows],
        "tokens_per_s": tps,
        "measured_step_s": step_s,
        "step_s": [row["step_s"] for row in log.rows],
        # A pipeline device may not hold the whole model, so it has no standalone throughput.
        "solo_tokens_per_s": {d: None for d in plan.devices},
        "fusion_efficiency": None,
        "devices": devices,
        "timeline": {r.device: ranks[r.rank]["events"][-3:] for r in roles},
        "metrics_path": cfg.metrics_path,
    }

