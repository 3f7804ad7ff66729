"""Converters: changes to a model made before the parallelisms (torchtitan's model converters).

A converter is the one place that knows one change to what a model trains or how its modules
compute: which parameters are frozen today; LoRA adapters on peft-named target modules and a
quantised frozen base, or MoE layers, later. Each has two sides that must agree:

- a pure side the planner reads (no torch): which gradient-reduction units (embed, block<i>, head,
  tied) stay trainable, so the memory model charges gradients and optimizer state, the cost model
  weight gradients, and the gradient sync bytes only for trainable parameters;
- a torch side the runtime applies to a stage module right after the stage cut and before tensor
  parallel and FSDP2 (runtime.parallel.parallelize, step 0.5), so every later step sees the
  converted modules and their requires_grad flags.

Which converters a plan runs, and in which order, is decided here (`plan_converters`) and nowhere else.
This package imports no torch: the planner imports it.
"""

from __future__ import annotations

from typing import Any, Protocol

from chipfuse.model.converters.freeze import Freeze


class Converter(Protocol):
    """One change to a model before the parallelisms."""

    def frozen_units(self) -> frozenset[str]:
        """Units whose every parameter the converted model leaves without gradient (pure)."""
        ...

    def convert(self, module: Any) -> None:
        """Change a stage module (model.split.StageModule) in place, before any parallelism."""
        ...


def plan_converters(plan: Any) -> tuple[Converter, ...]:
    """The converters `plan` (plan.plan.Plan) asks for, in the order they apply. A LoRA converter
    would come before Freeze: it freezes its base itself and adds trainable adapters."""
    return (Freeze(patterns=plan.freeze, spec=plan.model),) if plan.freeze else ()


def frozen_units(plan: Any) -> frozenset[str]:
    """Every unit that `plan`'s converters leave without trainable parameters."""
    out: frozenset[str] = frozenset()
    for c in plan_converters(plan):
        out |= c.frozen_units()
    return out


def apply_converters(module: Any, plan: Any) -> None:
    """Step 0.5 of runtime.parallel.parallelize: every converter of `plan`, in order, on a stage module."""
    for c in plan_converters(plan):
        c.convert(module)
