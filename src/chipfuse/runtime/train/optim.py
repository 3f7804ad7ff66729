"""Optimizer construction from the plan (the one place that knows optimizer choices)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from chipfuse.plan.plan import Plan


def build_optimizer(params: Iterable[torch.nn.Parameter], plan: Plan, *, lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter arithmetic on every layout, so a replica that holds a
    # stage and a single-device reference round the same way.
    from chipfuse.runtime.train.recipe import decay_groups

    # With decay, matrices decay and 1-D tensors (biases, norms) do not (runtime/train/recipe.py).
    groups = decay_groups(params, weight_decay) if weight_decay else list(params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=False)
