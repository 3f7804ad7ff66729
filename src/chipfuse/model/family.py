"""What a model family declares: one row that every layer asks instead of branching on a family name.

A family is the built-in GPT, the Llama presets, or one Hugging Face architecture (model_type).
Its row says how the planner prices it (default architecture fields, tensor sizes, the activation
table), how tensor parallelism splits it (or why it does not), where its pieces live, and which
module builds it with torch. The row is pure data and functions of a ModelSpec, so plan/ reads it
without importing torch; the torch side (`runtime`) is named by its dotted path and imported only
when a stage is built (model/build.py).

Adding a family: its module under model/families/ (or a row in families/hf.py for one more
Hugging Face architecture), its line in model/registry.py's BUILTIN, its tests (docs/models.md).
A test may register its own family with registry.register (tests/test_registry.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chipfuse.model.arch import Layout, SavedCoeffs


class Spec(Protocol):
    """What a row reads of a model.spec.ModelSpec. Named here so that the rows and the registry never
    import model.spec (which asks the registry for its defaults): the model package keeps no circle."""

    @property
    def name(self) -> str: ...
    @property
    def family(self) -> str: ...
    @property
    def model_type(self) -> str | None: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def tie_embeddings(self) -> bool: ...
    @property
    def hf_config(self) -> dict[str, Any] | None: ...
    @property
    def ffn(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    def arch(self) -> Any: ...

Numels = tuple[list[int], list[int], list[int]]
"""Numels of the parameter tensors of one block, of the embedding (first stage), of the head (last stage)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: what the planner, the runtime and the weight readers need to know of it."""

    name: str
    """The ModelSpec.family it serves: 'gpt', 'llama', 'hf' (then keyed by model_type too), a test's own."""
    model_type: str | None = None
    """The Hugging Face model_type served (name 'hf'); None for a family of its own."""
    runtime: Any
    """The torch side: a module, or its dotted path (imported when a stage is built, never by plan/),
    with build_full(spec, seed) -> nn.Module (the whole model, initialised by name) and
    build_stage(spec, stage, *, first, last, seed, full, device) -> model.split.StageModule; optionally
    meta_model(spec) (the whole model on meta: weight checks, export) and tp_block_forward (a block's
    forward with the member's heads, set by runtime/parallel/tp.py after the split)."""
    arch_defaults: Callable[[Spec], dict[str, Any]]
    """model.spec.Arch's fields a spec leaves None (ModelSpec.arch() fills them from here)."""
    default_ffn: Callable[[int], int]
    """The MLP width from the model width when a spec leaves ffn_dim None."""
    tensor_numels: Callable[[Spec], Numels]
    """Parameter tensors by size, for plan.memory's per-tensor optimizer and sharding arithmetic."""
    numels_exact: bool = True
    """False where tensor_numels borrows another family's list (plan --max-model says so)."""
    tp: Mapping[str, str] | None = None
    """Tensor-parallel plan by module name inside one block: 'colwise', 'rowwise' or 'fused_qkv'
    (runtime/parallel/tp.py). None: not run, `no_tp` says why."""
    no_tp: str = ""
    layout: Layout | None = None
    """Where a transformers model's pieces live (the HF stage and serving); None for a family of its own."""
    saved: SavedCoeffs | None = None
    """What one block saves for backward, as transformers' code does (plan.memory's per-architecture
    table); None: plan.memory's block formula for the built-in GPT's own module."""
    ties_embeddings: bool = True
    """Whether spec.tie_embeddings ties its head to its embedding (the built-in GPT never does)."""
    hf_weights: bool = False
    """Whether it has Hugging Face weights to load (--init-from) and export to."""
    hf_config: Callable[[Spec], dict[str, Any]] | None = None
    """The Hugging Face config dict (with model_type) transformers builds the model from."""
    config_fields: Callable[[Any, str], dict[str, Any]] | None = None
    """ModelSpec's shape and architecture fields read from transformers' config object (with the
    source for error messages): how a config.json of this model_type becomes a spec."""
    rehearsal_preset: str | None = None
    """The preset a rehearsal of a big model of this family runs (None: a tiny config of its architecture)."""
    gated_mlp_kernels: bool = False
    """The kernel model (plan/kernels.py, the profiler's FLOPs) prices the MLP's up projection as two
    matrices (gate and up) and k/v at kv_heads; False prices the GPT block (one up matrix, full k/v)."""

    @property
    def label(self) -> str:
        """How messages name it: the model_type of a Hugging Face architecture, else the family."""
        return f"model_type {self.model_type!r}" if self.model_type else f"family {self.name!r}"

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.name, self.model_type)
