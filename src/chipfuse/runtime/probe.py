"""Measure what a model needs on a device: parameter bytes and activation bytes per sample."""

from __future__ import annotations

import torch

from chipfuse.data import get_batch
from chipfuse.model.gpt import loss_sum
from chipfuse.model.spec import ModelSpec
from chipfuse.runtime.emulate import MemoryMeter
from chipfuse.runtime.stages import build_full, full_logits


def measure_memory(spec: ModelSpec, seq_len: int, samples: int = 2) -> tuple[int, int]:
    """(parameter bytes, peak saved-activation bytes per sample), from one real forward+backward."""
    torch.set_num_threads(1)
    model = build_full(spec)  # the built-in GPT or a Hugging Face Llama
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    meter = MemoryMeter(device_name="probe", cap_bytes=None)
    meter.set_static(list(model.parameters()))
    x, y = get_batch(0, samples, seq_len)
    with meter.track():
        loss_sum(full_logits(model, x), y).backward()
    act = meter.peak_bytes - meter.static_bytes
    return param_bytes, -(-act // samples)
