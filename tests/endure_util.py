"""Shared helpers of the endure tests: a tiny model, a single-process reference, worker launches."""

import os
import sys
from pathlib import Path

import torch

from chipfuse.data import get_batch
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import data_parallel_plan

TINY = ModelSpec(name="tiny", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
SRC = str(Path(__file__).resolve().parents[1] / "src")
WORKER = str(Path(__file__).resolve().parent / "endure_worker.py")
ENV = {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def plan_for(shares: dict[str, int]):
    return data_parallel_plan(TINY, shares, seq_len=32, micro_batch_size=8)


def reference_losses(steps: int, global_batch: int = 8, lr: float = 3e-3, spec: ModelSpec = TINY,
                     betas: tuple[float, float] = (0.9, 0.999)) -> list[float]:
    """One process, the whole batch: the loss curve every resumed or re-planned run must follow.
    (The trainer's recipe: betas (0.9, 0.95), see runtime/train/optim.py.)"""
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, foreach=False)
    out = []
    for step in range(steps):
        x, y = get_batch(step, global_batch, spec.seq_len)
        loss = loss_sum(model(x), y) / (global_batch * spec.seq_len)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def continue_from(path, steps: int, global_batch: int = 8, lr: float = 3e-3, spec: ModelSpec = TINY,
                  betas: tuple[float, float] = (0.9, 0.999)) -> dict[int, float]:
    """One process, the whole batch, from checkpoint `path` (DIR/step_N) up to `steps`: what any plan
    resuming from that checkpoint must compute, up to the rounding of its own split."""
    from chipfuse.runtime.endure import checkpoint

    model = build_model(spec, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, foreach=False)
    r = checkpoint.load(path, model=model, optimizer=opt, log=lambda m: None)
    out = {}
    for step in range(r.step, steps):
        x, y = get_batch(step, global_batch, spec.seq_len)
        loss = loss_sum(model(x), y) / (global_batch * spec.seq_len)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[step] = loss.item()
    return out


def worker_argv(ckpt, steps: int, every: int, out, sleep_s: float = 0.0):
    def make(plan_path, resume):
        return [sys.executable, WORKER, str(ckpt), str(plan_path), str(steps), str(every),
                "1" if resume else "0", str(out), str(sleep_s)]  # the worker resumes from its ckpt arg
    return make


def read_losses(out, rank: int = 0) -> dict[int, float]:
    """step -> loss from a worker's log (a redone step keeps its last value)."""
    d = {}
    for line in Path(f"{out}.{rank}").read_text().splitlines():
        s, loss, _ = line.split()
        d[int(s)] = float(loss)
    return d
