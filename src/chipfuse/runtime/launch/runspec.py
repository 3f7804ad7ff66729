"""One run, resolved once: the launcher turns flags, pool and plan into a RunSpec, writes it to
RUN_DIR/runspec.json, and every worker loads that file (runtime/launch/worker.py), whichever way
it was started: in this process for one device, under torchrun, or by the supervisor after a lost
device. A worker never re-enters the command line and never re-plans or re-checks the plan: what
it runs is what the launcher checked (torchtitan's JobConfig, loaded by every rank, is the model).

Kept beside the launchers rather than at the package root: only launch code writes or reads it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chipfuse.cluster.builtin import default_pool
from chipfuse.cluster.pool import Pool, load_pool
from chipfuse.data.loader import DataConfig
from chipfuse.errors import ChipfuseError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure.balance import BalanceConfig
from chipfuse.runtime.endure.endure import EndureConfig
from chipfuse.runtime.train.recipe import Recipe
from chipfuse.runtime.train.trainer import TrainConfig

BUILTIN_POOL = "builtin"
FILE_NAME = "runspec.json"
RESULT_NAME = "result.json"
"""Rank 0's raw summary, handed to the launcher's one summary writer (commands/train.py)."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    plan: Plan
    """The plan the launcher made or read, and checked once against the pool, the runtime and this host."""
    pool_source: str = BUILTIN_POOL
    """The pool file, or 'builtin' for the built-in emulated pool."""
    exclude: tuple[str, ...] = ()
    """Pool devices left out (--exclude): applied when the pool is loaded."""
    train: TrainConfig
    """Steps, lr, recipe, data, checkpoints and resume, endure settings, profile, initial weights."""
    run_dir: str
    """Where the plan, this spec, the metrics and the summary go."""
    summary_path: str
    """The run's summary JSON (--json, default RUN_DIR/summary.json); the launcher writes it once."""
    timeline_path: str | None = None
    """--timeline: a picture of the measured step beside the prediction."""

    # ------------------------------------------------------------------ the pool
    def pool(self) -> Pool:
        """The pool the plan was checked against: the same file, the same exclusions."""
        pool = default_pool() if self.pool_source == BUILTIN_POOL else load_pool(self.pool_source)
        return pool.subset([d.name for d in pool.devices if d.name not in self.exclude]) if self.exclude else pool

    @property
    def result_path(self) -> Path:
        return Path(self.run_dir) / RESULT_NAME

    # ------------------------------------------------------------------ the file
    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "pool_source": self.pool_source, "exclude": list(self.exclude),
                "train": dataclasses.asdict(self.train), "run_dir": self.run_dir, "summary_path": self.summary_path,
                "timeline_path": self.timeline_path}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<runspec>") -> RunSpec:
        train = _train_config(d["train"])
        return cls(plan=Plan.from_dict(d["plan"], source=f"{source} (plan)"), pool_source=d["pool_source"],
                   exclude=tuple(d["exclude"]), train=train, run_dir=d["run_dir"], summary_path=d["summary_path"],
                   timeline_path=d["timeline_path"])

    def save(self, path: str | Path | None = None) -> Path:
        """Write the spec (default RUN_DIR/runspec.json); returns where it went."""
        out = Path(path) if path else Path(self.run_dir) / FILE_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChipfuseError(f"{path}: cannot read the run spec ({e}). Fix: start the run with `chipfuse train`, "
                                "which writes it") from None
        return cls.from_dict(raw, source=str(path))


def _train_config(t: dict[str, Any]) -> TrainConfig:
    """TrainConfig back from its JSON form: the nested configs are dataclasses again."""
    endure = {**t["endure"], "balance": BalanceConfig(**t["endure"]["balance"])}
    recipe = Recipe(**t["recipe"]) if t["recipe"] else None
    return TrainConfig(**{**t, "endure": EndureConfig(**endure), "data": DataConfig(**t["data"]), "recipe": recipe})
