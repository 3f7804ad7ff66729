"""Shared pieces of the pipeline tests: tiny pools and plans, a single-device reference."""

from __future__ import annotations

import torch

from chipfuse.cluster.pool import Pool, pool_from_dict
from chipfuse.data import get_batch
from chipfuse.model.build import build_full, full_logits
from chipfuse.model.gpt import loss_sum
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig
from chipfuse.runtime.train.optim import build_optimizer

TINY_GPT = ModelSpec(name="tiny", num_layers=3, dim=64, num_heads=4, vocab_size=256, seq_len=32)
TINY_LLAMA = ModelSpec(name="tiny-llama", family="llama", num_layers=3, dim=64, num_heads=4, num_kv_heads=2,
                       ffn_dim=128, vocab_size=256, seq_len=32)


def pool_of(devices: dict[str, tuple[str, float]], name: str = "test") -> Pool:
    """devices: name -> (chip, speed), all emulated on this CPU, one node."""
    return pool_from_dict({"name": name, "node": [{"name": "host0", "device": [
        {"name": n, "chip": chip, "emulate": {"speed": speed}} for n, (chip, speed) in devices.items()]}]})


def plan_of(spec: ModelSpec, replicas: list[tuple[list[tuple[str, int]], int, int]], *, schedule: str = "1f1b",
            seq_len: int = 32, checkpoint: str = "none") -> Plan:
    """replicas: ([(device, num_layers), ...], batch_share, micro_batch_size)."""
    reps = []
    for stages, share, mbs in replicas:
        first, sts = 0, []
        for dev, n in stages:
            sts.append(Stage(devices=(dev,), first_layer=first, num_layers=n, checkpoint=checkpoint))
            first += n
        reps.append(Replica(stages=tuple(sts), batch_share=share, micro_batch_size=mbs))
    plan = Plan(model=spec, global_batch=sum(r.batch_share for r in reps), seq_len=seq_len,
                replicas=tuple(reps), schedule=schedule)
    plan.check()
    return plan


def run_steps(rank: int, world: int, plan: Plan, pool: Pool, steps: int, cfg: WorkerConfig,
              by_rank: list[str] | None = None) -> dict:
    """Worker body for tests.distributed.run_ranks: losses of every step, grads of step 0."""
    w = PipelineWorker(plan, pool, rank=rank, config=cfg, by_rank=by_rank)
    losses, grads = [], None
    for s in range(steps):
        w.opt.zero_grad(set_to_none=True)
        if s == 0:
            w.forward_backward(s)
            w.reduce_grads()
            grads = w.grads()
            w.opt.zero_grad(set_to_none=True)
        losses.append(w.step(s)["loss"])
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in w.module.parameters())
    return {"losses": losses, "grads": grads, "describe": w.describe(), "local_numel": local}


def reference(spec: ModelSpec, plan: Plan, steps: int, cfg: WorkerConfig) -> dict:
    """One device, whole global batch, same seed, loss and optimizer."""
    torch.set_num_threads(1)
    model = build_full(spec, cfg.seed)
    opt = build_optimizer(model.parameters(), plan, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tokens = plan.global_batch * plan.seq_len
    losses, grads = [], None
    for s in range(steps):
        x, y = get_batch(s, plan.global_batch, plan.seq_len, seed=cfg.data_seed)
        opt.zero_grad(set_to_none=True)
        loss = loss_sum(full_logits(model, x), y) / tokens
        loss.backward()
        if s == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}
