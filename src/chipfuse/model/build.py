"""Building any family's model or stage: the registry names the family's torch side, this calls it.

Built on the meta device and materialised alone (the stage's tensors only), initialised by name
with `seed` (model/init.py), then loaded from a Hugging Face folder (`init_from`) when given, this
rank's tensors only (model/weights.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec
from chipfuse.model.split import StageModule, StagePart
from chipfuse.model.weights import load_weights


def runtime_of(spec: ModelSpec) -> Any:
    """The torch side of the spec's family (Family.runtime), imported on first use."""
    rt = family_of(spec).runtime
    return importlib.import_module(rt) if isinstance(rt, str) else rt


def _no_weights(spec: ModelSpec, init_from: str) -> None:
    fam = family_of(spec)
    if not fam.hf_weights:
        raise ChipfuseError(f"--init-from {init_from}: {fam.label} ({spec.name!r}) has no Hugging Face weights. "
                            "Fix: give --model the folder's config.json instead")


def build_full(spec: ModelSpec, seed: int = 0, *, init_from: str | None = None) -> nn.Module:
    """The whole model of the spec's family: the single-device reference, initialised by name
    exactly as every stage of every layout is (or loaded from `init_from`)."""
    if init_from is not None:
        _no_weights(spec, init_from)
    model: nn.Module = runtime_of(spec).build_full(spec, seed)
    if init_from is not None:
        load_weights(model, init_from, tied=getattr(model, "tied", {}))
    return model


def build_stage(spec: ModelSpec, stages: tuple[StagePart, ...], index: int, *, seed: int = 0,
                full: nn.Module | None = None, init_from: str | None = None,
                device: str | torch.device = "cpu") -> StageModule:
    """The stage module for stages[index] of one replica.

    `full`: cut from an already materialised whole model instead (its tensors are shared)."""
    if init_from is not None:
        _no_weights(spec, init_from)
    first, last = index == 0, index == len(stages) - 1
    mod: StageModule = runtime_of(spec).build_stage(spec, stages[index], first=first, last=last, seed=seed,
                                                    full=full, device=device)
    if init_from is not None:
        load_weights(mod, init_from, tied=mod.tied)
    return mod


def full_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of a model from build_full, whatever its family."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def tp_block_forward(spec: ModelSpec) -> Any:
    """The family's block forward for a tensor-parallel member (None: the block's own forward works)."""
    rt: ModuleType | Any = runtime_of(spec)
    return getattr(rt, "tp_block_forward", None)
