"""The freeze converter: parameters of the named units keep their values and get no gradient.

Patterns name gradient-reduction units, the pieces every layer of chipfuse already counts in (the
planner's memory and cost tables, the runtime's per-unit gradient sum): `embed`, `head`,
`block<i>`, a range `block0-3` (both ends included) or a glob `block*`. With tied embeddings
the shared matrix is unit `tied`, and `embed` freezes it too (it is the embedding's matrix).

A frozen parameter is requires_grad False: autograd gives it no gradient, the optimizer is not
handed it, the gradient sync sends nothing for it, checkpoints keep its weights and no optimizer
state. Freezing whole units keeps the planner exact without reading parameter names: a unit is
trainable or not. Finer targets (peft's module names) are a LoRA converter's business.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec

FREEZE_HELP = ("comma-separated units to leave untrained: embed, head, block2, block0-3, block* (no gradients, "
               "optimizer state or sync traffic for them)")
_RANGE = re.compile(r"block(\d+)-(\d+)")


def model_units(spec: ModelSpec) -> list[str]:
    """Every unit a freeze pattern can name, in model order (the tied unit only when tied)."""
    tied = ["tied"] if spec.tie_embeddings else []
    return ["embed", *(f"block{i}" for i in range(spec.num_layers)), "head", *tied]


def match_units(patterns: tuple[str, ...], spec: ModelSpec, *, where: str) -> frozenset[str]:
    """The units `patterns` name. A pattern that names none is refused with one line: `where` is the
    flag or plan field it came from."""
    units = model_units(spec)
    out: set[str] = set()
    for pat in patterns:
        m = _RANGE.fullmatch(pat)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            hit = [f"block{i}" for i in range(lo, hi + 1) if f"block{i}" in units] if lo <= hi else []
        else:
            hit = fnmatch.filter(units, pat)
        if not hit:
            raise PlanError(f"{where}: {pat!r} names no unit of model {spec.name!r} (it has embed, "
                            f"block0..block{spec.num_layers - 1}, head{', tied' if 'tied' in units else ''}). "
                            "Fix: name units like embed, head, block2, block0-3 or block*")
        out.update(hit)
    if "embed" in out and "tied" in units:
        out.add("tied")
    return frozenset(out)


@dataclass(frozen=True, kw_only=True)
class Freeze:
    """Freeze every parameter of the units `patterns` names (plan field `freeze`)."""

    patterns: tuple[str, ...]
    spec: ModelSpec

    def frozen_units(self) -> frozenset[str]:
        return match_units(self.patterns, self.spec, where="freeze")

    def convert(self, module: Any) -> None:
        frozen = self.frozen_units()
        params = dict(module.named_parameters())
        for unit, names in module.units().items():
            if unit in frozen:
                for n in names:
                    params[n].requires_grad_(False)


def with_freeze(plan: Any, flag: str | None) -> Any:
    """`plan` (plan.plan.Plan) with the units of a `--freeze` flag (comma-separated patterns) frozen, or
    unchanged without the flag. Refused with one line naming the flag."""
    if flag is None:
        return plan
    from dataclasses import replace

    patterns = tuple(p.strip() for p in flag.split(",") if p.strip())
    match_units(patterns, plan.model, where="--freeze")
    out = replace(plan, freeze=patterns)
    out.check(source="--freeze")
    return out
