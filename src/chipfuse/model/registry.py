"""The model-family registry: which Family row (model/family.py) serves a ModelSpec.

Every layer asks `family_of(spec)` for what depends on the family (defaults, tensor sizes, the
activation table, the tensor-parallel plan, the torch builder) instead of branching on its name.
Pure: no torch, so the planner imports it freely.

Keys: (spec.family, spec.model_type) for a Hugging Face architecture ('hf', 'qwen2'),
(spec.family, None) for a family of its own ('gpt', 'llama', a test's).
"""

from __future__ import annotations

from chipfuse.errors import ChipfuseError
from chipfuse.model.arch import Layout
from chipfuse.model.families import gpt, hf, llama
from chipfuse.model.family import Family, Spec

_FAMILIES: dict[tuple[str, str | None], Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Add a family; refused when its key is taken (`replace` swaps it: a test's stand-in)."""
    if family.key in _FAMILIES and not replace:
        raise ValueError(f"{family.label} is already registered")
    _FAMILIES[family.key] = family
    return family


def unregister(family: Family) -> None:
    """Remove a family registered by a test (the built-ins stay for the life of the process)."""
    _FAMILIES.pop(family.key, None)


def find(spec: Spec) -> Family | None:
    """The family serving the spec, None when none does."""
    return _FAMILIES.get((spec.family, spec.model_type)) or _FAMILIES.get((spec.family, None))


def family_of(spec: Spec) -> Family:
    fam = find(spec)
    if fam is None:
        raise ChipfuseError(f"model {spec.name!r}: family {spec.family!r} (model_type {spec.model_type!r}) has no "
                            f"registered family. Fix: use one of {names()}")
    return fam


def names() -> list[str]:
    """Registered families as a user names them: 'gpt', 'llama', 'hf/qwen2', ..."""
    return sorted(f"{f.name}/{f.model_type}" if f.model_type else f.name for f in _FAMILIES.values())


def model_types() -> list[str]:
    """The Hugging Face model_types a config.json may name."""
    return sorted(f.model_type for f in _FAMILIES.values() if f.name == "hf" and f.model_type)


def hf_family(model_type: str) -> Family | None:
    """The row of a Hugging Face model_type, None when chipfuse has none."""
    return _FAMILIES.get(("hf", model_type))


def tp_refusal(spec: Spec) -> str | None:
    """Why a tensor-parallel stage of this model is not run; None when it is."""
    fam = family_of(spec)
    if fam.tp is None:
        return f"{fam.label}: {fam.no_tp or 'its family declares no tensor-parallel plan'}"
    if spec.arch().qk_norm:
        # The norm runs on each member's own heads, so its weight's gradient is a partial sum that
        # DTensor's colwise/rowwise plan never adds up over the group.
        return (f"{fam.label}: its q/k norms (one weight over head_dim shared by all heads) would get only a "
                "member's heads' gradient")
    return None


def layout_of(spec: Spec) -> Layout:
    """Where the pieces of a transformers-built spec live (its family's layout)."""
    fam = family_of(spec)
    if fam.layout is None:
        raise ChipfuseError(f"model {spec.name!r}: {fam.label} is not built by transformers (no module layout). "
                            "Fix: give a Hugging Face config.json")
    return fam.layout


for _fam in (gpt.FAMILY, llama.FAMILY, *hf.ROWS):
    register(_fam)
