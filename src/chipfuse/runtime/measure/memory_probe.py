"""Train a GPT for a few steps under one memory strategy and an emulated memory cap.

Used by the memory tests and benchmarks/memory.py to *measure* whether a strategy fits and what
it costs. The ranks are described by a plan (`probe_plan`) and the strategy goes through the
trainer's own path: runtime.parallel.parallelize with the stage's degrees, then the trainer's
optimizer builder. Under sharding the ranks are one stage group (dp_degree = ranks) holding one
model between them and splitting every batch evenly; without it they are plain data-parallel
replicas whose gradients are summed as the trainer sums them
(runtime.sync.data_parallel.all_reduce_gradients: one flat buffer, freed after the step).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from chipfuse.data import get_batch
from chipfuse.errors import ChipfuseError, DeviceMemoryError
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.memory import Strategy
from chipfuse.plan.plan import Plan, Replica, Stage, data_parallel_plan
from chipfuse.runtime.emulate.device import MemoryMeter
from chipfuse.runtime.parallel.memory import (
    build_plan_optimizer,
    device_state_tensors,
    refuse_host_offload,
    watch_gathered,
)
from chipfuse.runtime.parallel.parallelize import parallelize
from chipfuse.runtime.sync.data_parallel import all_reduce_gradients


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    rank: int
    losses: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    static_bytes: int = 0
    step_s: float = 0.0
    """Fastest wall time of the steps after the first: best-of, as emulate.solo_time, because other
    processes on a shared machine only ever add time."""
    error: str | None = None
    """'oom: ...' when the emulated cap was passed, 'refused: ...' for a refused plan."""
    grads: dict[str, torch.Tensor] | None = None
    """Full gradients of the first step (only with want_grads)."""


def _plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def probe_plan(spec: ModelSpec, cfg: Strategy, *, world: int, global_batch: int, seq_len: int) -> Plan:
    """The probe's ranks as a plan: with a ZeRO level over several ranks, one stage group sharded over
    all of them; else one whole-model replica per rank. Shares split the batch as evenly as can be."""
    per_rank, extra = divmod(global_batch, world)
    shares = {f"dev{r}": per_rank + (r < extra) for r in range(world)}
    if cfg.shard != "none" and world > 1:
        st = Stage(devices=tuple(shares), first_layer=0, num_layers=spec.num_layers, dp_degree=world,
                   checkpoint=cfg.checkpoint, shard=cfg.shard, offload=cfg.offload)
        plan = Plan(model=spec, global_batch=global_batch, seq_len=seq_len,
                    replicas=(Replica(stages=(st,), batch_share=global_batch, micro_batch_size=global_batch),))
    else:
        plan = data_parallel_plan(spec, shares, seq_len=seq_len, micro_batch_size=max(shares.values()))
        plan = replace(plan, replicas=tuple(replace(r, stages=(replace(r.stages[0], checkpoint=cfg.checkpoint,
                                                                       shard=cfg.shard, offload=cfg.offload),))
                                            for r in plan.replicas))
    return replace(plan, dtype=cfg.dtype, optimizer_dtype=cfg.optimizer_dtype)


def run_probe(spec: ModelSpec, cfg: Strategy, *, global_batch: int, seq_len: int, steps: int,
              cap_bytes: int | None, device_name: str | None = None, lr: float = 1e-3, seed: int = 0,
              want_grads: bool = False, host_is_device: bool = False) -> ProbeResult:
    """Run on every rank of the current group (or alone). Raises nothing: errors come back in the result.
    host_is_device: the rank stands for a CPU device (not an emulated accelerator), where offload is refused."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device_name = device_name or f"dev{rank}"
    meter = MemoryMeter(device_name=device_name, cap_bytes=cap_bytes)
    losses: list[float] = []
    times: list[float] = []
    grads = None
    try:
        if host_is_device:
            refuse_host_offload(device_name, cfg.offload)
        plan = probe_plan(spec, cfg, world=world, global_batch=global_batch, seq_len=seq_len)
        stage = plan.replicas[0 if len(plan.replicas) == 1 else rank].stages[0]
        model = build_model(spec, seed=seed)
        # mesh None: the whole world, which is the probe's one group.
        applied = parallelize(model, cfg, dims=stage.dims, model=spec, mesh=None,
                              device_type=next(model.parameters()).device.type)
        opt = build_plan_optimizer(model.parameters(), cfg, plan=plan, lr=lr)
        if applied.fsdp:
            watch_gathered(model, meter)
        per_rank, extra = divmod(global_batch, world)
        start = rank * per_rank + min(rank, extra)
        count = per_rank + (rank < extra)
        for step in range(steps):
            t0 = time.perf_counter()
            meter.set_static(device_state_tensors(model, opt, offload=cfg.offload), what="model state")
            x, y = get_batch(step, global_batch, seq_len, start=start, count=count, seed=seed)
            with meter.track():
                logits = model(x)
                loss = loss_sum(logits, y) / (global_batch * seq_len)
                loss.backward()
            if not applied.fsdp:
                all_reduce_gradients(list(model.parameters()))  # the trainer's flat SUM all-reduce
            if want_grads and step == 0:
                grads = {_plain_name(n): _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            meter.set_static(device_state_tensors(model, opt, offload=cfg.offload), what="gradients and optimizer state")
            opt.zero_grad(set_to_none=True)
            total = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total)
            losses.append(float(total))
            times.append(time.perf_counter() - t0)
        error = None
    except DeviceMemoryError as e:
        error = f"oom: {e}"
    except ChipfuseError as e:
        error = f"refused: {e}"
    later = times[1:] or times or [0.0]
    return ProbeResult(rank=rank, losses=losses, peak_bytes=meter.peak_bytes, static_bytes=meter.static_bytes,
                       step_s=min(later), error=error, grads=grads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(queue, obj: dict) -> None:
    # Plain pickle: by value. The queue's own pickler would pass tensors as shared-memory handles,
    # which die with this process before the parent reads them.
    queue.put(pickle.dumps(obj))
    queue.close()
    queue.join_thread()  # flush before os._exit, which would drop what the feeder thread holds


def _worker(rank: int, world: int, port: int, queue, cfgs: list[Strategy], kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # one thread per emulated device (docs/emulation.md, "Facts measured on CPU")
    try:
        if world > 1:
            dist.init_process_group("gloo")
        results = []
        for cfg in cfgs:
            results.append(asdict(run_probe(cfg=cfg, **kwargs)))
            if results[-1]["error"] is not None:
                break  # its peers may wait for it in a collective: the parent stops them
        _send(queue, {"rank": rank, "results": results})
        if results[-1]["error"] is not None:
            os._exit(0)
    except Exception:
        _send(queue, {"rank": rank, "results": [{"rank": rank, "error": "crash: " + traceback.format_exc()}]})
        os._exit(1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


def spawn_probe(world: int, *, cfgs: list[Strategy], timeout_s: float = 300.0, **kwargs) -> list[list[ProbeResult]]:
    """run_probe for each of `cfgs` in turn, on `world` fresh gloo ranks (127.0.0.1); one process start
    for them all (a start costs seconds here). Returns, per config, the results sorted by rank.

    One rank running out of memory ends the run: its peers are stopped rather than left waiting in
    a collective, and the configs not reached report that error."""
    import multiprocessing as mp
    import queue as queue_mod

    # forkserver: one server imports torch, FSDP2 and torchao once; every worker is forked from it,
    # which saves seconds per start on a busy machine. The server runs no torch op before forking.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["chipfuse.runtime.measure.memory_probe", "torch.distributed.fsdp",
                                "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "torchao.optim"])
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q, cfgs, kwargs), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, list[dict]] = {}
    deadline = time.monotonic() + timeout_s
    first_error = None
    while len(got) < world and time.monotonic() < deadline:
        try:
            msg = pickle.loads(q.get(timeout=0.5 if first_error is None else 5.0))
            got[msg["rank"]] = msg["results"]
            first_error = first_error or msg["results"][-1].get("error")
        except queue_mod.Empty:
            if first_error is not None or not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(timeout=1.0 if first_error else 10.0)
        if p.is_alive():
            p.kill()
            p.join()
    missing = first_error or "crash: no result (timeout)"
    return [[ProbeResult(**(got.get(r, [])[i] if i < len(got.get(r, [])) else {"rank": r, "error": missing}))
             for r in range(world)] for i in range(len(cfgs))]
