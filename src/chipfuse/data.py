"""Training text that needs no download: the Python standard library's own sources, as bytes.

Every sample of every global batch is fixed by (seed, step, index in batch) alone, so any
split of a batch over devices sees exactly the samples a single device would.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch


@functools.cache
def corpus(max_bytes: int = 8 << 20) -> torch.Tensor:
    """Up to `max_bytes` of stdlib .py sources, in a fixed order, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if total < 1 << 16:
        # Some minimal Pythons ship no sources: fall back to generated text with structure.
        g = torch.Generator().manual_seed(0)
        words = [bytes(f"def f{i}(x):\n    return x * {i}\n", "ascii") for i in range(1000)]
        order = torch.randint(0, len(words), (20000,), generator=g).tolist()
        chunks = [words[i] for i in order]
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def batch_indices(step: int, global_batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Start offsets of the `global_batch` samples of global step `step`."""
    n = corpus().numel() - seq_len - 1
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (global_batch,), generator=g)


def get_batch(step: int, global_batch: int, seq_len: int, start: int = 0, count: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [start, start+count) of global step `step`: inputs and targets, (count, seq_len) int64."""
    data = corpus()
    offs = batch_indices(step, global_batch, seq_len, seed)[start: start + (global_batch - start if count is None else count)]
    idx = offs[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
