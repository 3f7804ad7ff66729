"""Which tokens each sample of each global step reads: a pure function of (seed, step, index).

A replica with offset o and share s in the global batch takes samples o .. o+s-1 of step
`step`; the samples themselves do not depend on the shares, on the number of devices or on what
ran before. So any split of a batch sees exactly the samples one device would (parity), a
resumed run continues with exactly the samples the interrupted one would have seen, and a run
re-planned over fewer devices (same global batch and sequence length, which resume enforces)
trains the same samples at the same steps.

Two rules:
- `RandomOffsets` (the built-in corpus, unchanged since the first version): the `global_batch`
  start offsets of step s are drawn uniformly from the source by a generator seeded with
  seed * 1_000_003 + s. Samples may overlap and repeat.
- `EpochWindows` (data files): the split is cut into non-overlapping windows of seq_len + 1
  tokens (consecutive windows share one boundary token, the target of one and the first input of
  the next). Global sample g = step * global_batch + index falls in epoch g // W at position
  g % W (W windows); it reads window perm_epoch[g % W], perm_epoch a permutation of the windows
  seeded by seed * 1_000_003 + epoch. Every window is trained once per epoch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

SEED_STRIDE = 1_000_003  # seed and step (or epoch) into one generator seed, as the first version did


class Sampler(Protocol):
    def starts(self, step: int, global_batch: int, first: int, count: int) -> np.ndarray:
        """Token offsets of samples first .. first+count-1 of global step `step`."""
        ...

    def describe(self) -> dict:
        ...


class RandomOffsets:
    def __init__(self, *, num_starts: int, seed: int):
        self.num_starts, self.seed = num_starts, seed

    def all_starts(self, step: int, global_batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)
        return torch.randint(0, self.num_starts, (global_batch,), generator=g)

    def starts(self, step: int, global_batch: int, first: int, count: int) -> np.ndarray:
        return self.all_starts(step, global_batch)[first: first + count].numpy()

    def describe(self) -> dict:
        return {"rule": "random-offsets", "num_starts": self.num_starts}


class EpochWindows:
    def __init__(self, *, num_windows: int, seq_len: int, seed: int, base: int = 0):
        self.num_windows, self.seq_len, self.seed, self.base = num_windows, seq_len, seed, base
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            self._perms[epoch] = torch.randperm(self.num_windows, generator=g).numpy()
        return self._perms[epoch]

    def starts(self, step: int, global_batch: int, first: int, count: int) -> np.ndarray:
        g = step * global_batch + np.arange(first, first + count, dtype=np.int64)
        epochs, pos = g // self.num_windows, g % self.num_windows
        windows = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            windows[sel] = self._perm(int(e))[pos[sel]]
        return self.base + windows * self.seq_len

    def epoch_of(self, step: int, global_batch: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * global_batch / self.num_windows

    def describe(self) -> dict:
        return {"rule": "epoch-windows", "num_windows": self.num_windows}
