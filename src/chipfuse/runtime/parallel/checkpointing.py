"""Activation checkpointing of transformer blocks (torch's checkpoint_wrapper, non-reentrant).

"full": every block re-runs its forward in backward; only block inputs are kept.
"selective": every other block by its layer number in the whole model (layers 0, 2, 4, ...):
torchtitan's layer-selective mode with frequency 2, about half the activations for about half the
recompute, which is what the cost model (plan.memory_model) charges. The layer number, not the
place in the stage, decides, so a model cut into stages recomputes the same blocks as a whole one.
(Op-level selective checkpointing would keep matmul outputs inside torch's checkpoint frame, where
the emulated meter cannot see them; the layer mode is what the meter counts honestly.)
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from chipfuse.model.init import get

WRAPPED = "._checkpoint_wrapped_module"


def blocks_of(module: nn.Module) -> list[tuple[Any, Any, int]]:
    """(container, key, layer number in the whole model) of every transformer block of a whole model
    (`blocks` ModuleList, `model.layers`) or of a stage module (the same names, as ModuleDicts keyed
    by layer number; a Hugging Face stage names its layer container in its layout, `transformer.h` for
    GPT-2, `model.decoder.layers` for OPT)."""
    container = getattr(module, "blocks", None)
    lay = getattr(module, "lay", None)
    if container is None and lay is not None:
        container = get(module, lay.layers)
    if container is None and isinstance(getattr(module, "model", None), nn.Module):
        container = getattr(module.model, "layers", None)
    if isinstance(container, nn.ModuleList):
        return [(container, i, i) for i in range(len(container))]
    if isinstance(container, nn.ModuleDict):
        return [(container, k, int(k)) for k in container.keys()]
    raise TypeError(f"{type(module).__name__} has no `blocks`, layout layers or `model.layers` to checkpoint "
                    "or shard")


def block_modules(module: nn.Module) -> list[nn.Module]:
    return [c[k] for c, k, _ in blocks_of(module)]


def apply_checkpointing(module: nn.Module, mode: str) -> list[int]:
    """Wrap the chosen blocks. Returns their layer numbers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return []
    if mode not in ("selective", "full"):
        raise ValueError(f"checkpoint mode {mode!r}: use none, selective or full")
    if hasattr(module, "checkpoint_mode"):
        module.checkpoint_mode = "none"  # type: ignore[assignment]  # the stage's own switch: the wrapper decides
    every = 1 if mode == "full" else 2
    chosen = []
    for container, key, layer in blocks_of(module):
        if layer % every == 0:
            # preserve_rng_state: recompute sees the same random stream, so the maths is unchanged.
            container[key] = checkpoint_wrapper(container[key], preserve_rng_state=True)
            chosen.append(layer)
    return chosen


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model has it."""
    return name.replace(WRAPPED, "")
