"""Validation loss and perplexity on the held-out split, every N steps (and after the last).

The validation set is fixed (data.loader: the first windows of the held-out tail), and each
replica evaluates the same fraction of it as its share of the training batch, so the replicas
tile it exactly and the summed token loss over all ranks, divided by the set's token count, is
the loss one device would compute on the whole set. The loop calls:

    extra |= validator.maybe_run(step)   # after the update; collective when due; goes in the log row
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from chipfuse.data.loader import Loader


class Validator:
    def __init__(self, loader: Loader, *, every: int, total_steps: int, place: Callable[[], tuple[int, int]],
                 loss_sum: Callable[[int, int], float]):
        """place(): this rank's (offset, share) in the global batch now (rebalancing moves them);
        loss_sum(start, count): the summed token loss of validation samples [start, start+count)
        computed by this rank (runtime.parallel.pipeline.PipelineWorker.eval_loss_sum: 0 on ranks that hold
        no loss, e.g. a pipeline's first stages)."""
        self.loader, self.every, self.total_steps = loader, every, total_steps
        self.place, self.loss_sum = place, loss_sum
        self.history: list[dict[str, float]] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and ((step + 1) % self.every == 0 or step + 1 == self.total_steps)

    def maybe_run(self, step: int) -> dict[str, float]:
        return self.run(step) if self.due(step) else {}

    def run(self, step: int) -> dict[str, float]:
        start, count = self.loader.val_share(*self.place())
        total = torch.tensor([self.loss_sum(start, count) if count else 0.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(total)
        loss = float(total) / (self.loader.num_eval_samples * self.loader.seq_len)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
        self.history.append({"step": step, **out})
        return out

    def summary(self) -> dict[str, Any]:
        if not self.every:
            return {}
        last = self.history[-1] if self.history else {}
        return {"validation": {"every": self.every, "samples": self.loader.num_eval_samples,
                               "tokens": self.loader.num_eval_samples * self.loader.seq_len,
                               "history": self.history},
                "final_val_loss": last.get("val_loss"), "final_val_ppl": last.get("val_ppl")}


def progress_suffix(row: dict) -> str:
    """The progress line's validation part (empty on steps without an evaluation)."""
    if "val_loss" not in row:
        return ""
    return f" | val {row['val_loss']:.3f} ppl {row['val_ppl']:.1f}"
