"""Per-step measurements: gathered from every rank to rank 0, logged as JSON lines, shown live."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

FIELDS = ("loss_sum", "samples", "compute_s", "padded_s", "comm_s", "step_s")


def gather_row(values: dict[str, float]) -> list[dict[str, float]]:
    """All ranks' values of FIELDS, as a list indexed by rank (one small all_gather)."""
    t = torch.tensor([float(values[k]) for k in FIELDS], dtype=torch.float64)
    if not dist.is_initialized():
        return [dict(zip(FIELDS, t.tolist(), strict=True))]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [dict(zip(FIELDS, o.tolist(), strict=True)) for o in out]


@dataclass
class StepLog:
    """Rank 0's record of the run; writes one JSON line per step."""

    devices: list[str]
    seq_len: int
    path: Path | None = None
    emulated: bool = False
    append: bool = False
    """Keep the lines already there (a resumed run continues the same log)."""
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.path is not None and not self.append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def add(self, step: int, per_rank: list[dict[str, float]], **extra: object) -> dict:
        tokens = sum(r["samples"] for r in per_rank) * self.seq_len
        step_s = max(r["step_s"] for r in per_rank)
        row = {
            "step": step,
            "loss": sum(r["loss_sum"] for r in per_rank) / max(tokens, 1),
            "tokens": tokens,
            "step_s": step_s,
            "tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
            "emulated": self.emulated,
            "devices": {
                name: {
                    "samples": int(r["samples"]),
                    "compute_s": r["compute_s"],
                    "padded_s": r["padded_s"],
                    "comm_s": r["comm_s"],
                    "wait_s": max(0.0, step_s - r["compute_s"] - r["comm_s"]),
                    "tokens_per_s": r["samples"] * self.seq_len / r["compute_s"] if r["compute_s"] > 0 else 0.0,
                }
                for name, r in zip(self.devices, per_rank, strict=True)
            },
            **extra,
        }
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def steady_tokens_per_s(self, skip: int = 2) -> float:
        """Tokens over time of the steps after the first `skip` (warm-up) steps."""
        rows = self.rows[skip:] if len(self.rows) > skip else self.rows
        return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)

    def steady_step_s(self, skip: int = 2) -> float:
        rows = self.rows[skip:] if len(self.rows) > skip else self.rows
        return statistics.median(r["step_s"] for r in rows)
