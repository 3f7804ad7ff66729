"""The optimisation recipe of a run: learning-rate warm-up and cosine decay, gradient clipping by
global norm, weight decay. The loop calls one hook just before `optimizer.step()`:

    stats = recipe_step.before_update(step)   # sets this step's lr, clips; collective
    optimizer.step()                          # stats ({"lr", "grad_norm"}) go in the step's log row

The global norm is the norm of the fully reduced gradient, the one a single device computing the
whole global batch would clip (torch.nn.utils.clip_grad_norm_): taken after the gradient
reduction (runtime.sync.grad_sync.UnitSync), it sums the squares of each unique parameter once. Every
replica holding a layer holds the same reduced gradient, so one replica counts it: the one whose
stage group holds the lowest of the layer's ranks (runtime.parallel.topology.Topology.unit_ranks). Inside
that group a plain tensor is counted by that lowest rank (a tensor-parallel group's members hold
equal copies), a DTensor (tensor-parallel or FSDP2 piece) by every member for its own piece,
replicated mesh dimensions at coordinate 0. One SUM all-reduce of a scalar then gives every rank
the same norm, and every copy of every gradient is scaled by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist

from chipfuse.errors import ChipfuseError


@dataclass(frozen=True, kw_only=True)
class Recipe:
    lr: float = 3e-3
    """Peak learning rate (after warm-up)."""
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    """Linear warm-up from lr / warmup_steps at step 0 to lr at step warmup_steps - 1."""
    min_lr: float | None = None
    """Where cosine decay ends; None = lr / 10."""
    decay_steps: int | None = None
    """The step where cosine decay reaches min_lr (held after); None = the run's total steps."""
    grad_clip: float = 0.0
    """Largest global gradient norm (0 = no clipping)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) decay of the matrices; biases, norms and other 1-D tensors are not decayed."""

    def check(self) -> None:
        bad = [(n, v) for n, v in (("--lr", self.lr), ("--warmup-steps", self.warmup_steps),
                                   ("--grad-clip", self.grad_clip), ("--weight-decay", self.weight_decay))
               if not (v >= 0 and math.isfinite(v))]
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            bad.append(("--min-lr", self.min_lr))
        if self.decay_steps is not None and self.decay_steps < 1:
            bad.append(("--decay-steps", self.decay_steps))
        if bad:
            flag, v = bad[0]
            raise ChipfuseError(f"{flag} {v}: out of range. Fix: a finite value >= 0 (--min-lr at most --lr, "
                                "--decay-steps at least 1)")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def lr_at(self, step: int, total_steps: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        end = self.decay_steps or total_steps
        span = max(1, end - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self) | {"min_lr": self.final_lr if self.schedule == "cosine" else self.min_lr}


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices (embeddings and linear weights) decay, 1-D tensors do not."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _owned_sum_of_squares(grad: torch.Tensor, owned: bool) -> torch.Tensor:
    """owned: whether this rank counts this gradient (a DTensor: whether its group counts it; then
    each member counts its own piece)."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(grad, DTensor):
        coords = list(grad.device_mesh.get_coordinate() or [])
        # A piece is unique unless a mesh dimension replicates it: then coordinate 0 counts it.
        owned = owned and all(c == 0 for c, pl in zip(coords, grad.placements, strict=True)
                              if isinstance(pl, Replicate))
        grad = grad.to_local()
    if not owned:
        return torch.zeros((), dtype=torch.float64, device=grad.device)
    return grad.double().pow(2).sum()


def global_grad_norm(params: Sequence[torch.Tensor], *, owns: Callable[[torch.Tensor], bool],
                     group: dist.ProcessGroup | None = None) -> float:
    """The norm of the fully reduced gradient over all ranks of `group` (None: the world).
    `owns(p)`: whether this rank counts parameter p (a DTensor: its group); see the module docstring."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            total += _owned_sum_of_squares(p.grad, owns(p)).cpu()
    if dist.is_initialized():
        dist.all_reduce(total, group=group)  # gloo: a CPU scalar reaches every backend
    return float(total.sqrt())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class RecipeStep:
    """The hook before optimizer.step(): this step's learning rate, and clipping by global norm."""

    def __init__(self, recipe: Recipe, optimizer: torch.optim.Optimizer, *, total_steps: int,
                 params: Sequence[torch.Tensor], owns: Callable[[torch.Tensor], bool],
                 group: dist.ProcessGroup | None = None):
        self.recipe, self.optimizer, self.total_steps = recipe, optimizer, total_steps
        self.params, self.owns, self.group = list(params), owns, group
        self.clipped_steps = 0

    def before_update(self, step: int) -> dict[str, float]:
        lr = self.recipe.lr_at(step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = {"lr": lr}
        if self.recipe.grad_clip > 0:
            norm = global_grad_norm(self.params, owns=self.owns, group=self.group)
            coef = clip_coefficient(norm, self.recipe.grad_clip)
            if coef < 1.0:
                self.clipped_steps += 1
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            out["grad_norm"] = norm
        return out

    def summary(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "clipped_steps": self.clipped_steps}


def recipe_of(cfg: object) -> Recipe:
    """The run's recipe: TrainConfig.recipe, or (older callers) a constant lr with its weight decay."""
    given = getattr(cfg, "recipe", None)
    if given is not None:
        return given
    return Recipe(lr=getattr(cfg, "lr", 3e-3), weight_decay=getattr(cfg, "weight_decay", 0.0))


def unit_owner(unit_params: dict[str, list[torch.nn.Parameter]], unit_ranks: dict[str, tuple[int, ...]],
               rank: int, *, members: tuple[int, ...] | None = None) -> Callable[[torch.Tensor], bool]:
    """`owns` for a rank of any plan (runtime.parallel.pipeline.PipelineWorker): a unit's (embedding, block,
    head) parameters are counted by the group holding the lowest of the unit's ranks; in it, a plain
    tensor by that rank alone, a DTensor's pieces by every member. members: this rank's stage group
    (default: this rank alone)."""
    from torch.distributed.tensor import DTensor

    group = members or (rank,)
    plain: set[int] = set()
    pieces: set[int] = set()
    for u, ps in unit_params.items():
        low = min(unit_ranks.get(u, (rank,)))
        plain |= {id(p) for p in ps if low == rank}
        pieces |= {id(p) for p in ps if low in group}
    return lambda p: id(p) in (pieces if isinstance(p, DTensor) else plain)
