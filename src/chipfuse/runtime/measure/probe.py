"""Measure how fast this host's thread trains a model: the unit emulated devices are paced to.

Memory is not measured here: plan/memory.py predicts it for every plan (no model is built to size one)."""

from __future__ import annotations

import torch

from chipfuse.data import get_batch
from chipfuse.model.build import build_full, full_logits
from chipfuse.model.gpt import loss_sum
from chipfuse.model.spec import ModelSpec


def measure_unit_s(spec: ModelSpec, *, seq_len: int | None = None, micro_batch: int = 8, repeats: int = 5) -> float:
    """Seconds per sample of one unslowed worker (one thread): forward and backward, best of `repeats`,
    at the run's `seq_len` (default: the model's context). Never the model's context for a run that
    trains shorter: a config allowing 8192 positions then needs attention memory for 8192 x 8192
    per head, and a 135M model grew the launcher past 24 GB.

    Benchmarks that compare runs pass this to every run (`--unit-s`): one emulated chip should
    have one speed, and two start-up calibrations on a busy machine can differ by 2-3x."""
    from chipfuse.runtime.emulate.device import solo_time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_full(spec)
        x, y = get_batch(0, micro_batch, seq_len or spec.seq_len)
        return solo_time(lambda: loss_sum(full_logits(model, x), y).backward(), repeats=repeats) / micro_batch
    finally:
        torch.set_num_threads(threads)
