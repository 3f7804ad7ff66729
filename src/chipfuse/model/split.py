"""Stage modules: one contiguous run of a model's layers, built without the rest of the model.

No rank materialises more than its own part: the whole model is built on the meta device (no
memory), the stage keeps the modules it runs, and only those are materialised (`to_empty`) and
initialised. Every layout starts from the same weights because each module is initialised from a
generator seeded by (seed, the module's full name), never by the order modules happen to be
built in: stage 2 of a 3-stage split and the single-device reference draw the same numbers for
`model.layers.5.mlp.up_proj`.

Stage modules keep the full model's parameter names (`blocks.3.qkv.weight`,
`model.layers.1.mlp.up_proj.weight`), so gradients of any layout compare name by name with a
single-device reference, checkpoints key tensors by those names, and `--init-from` finds each
tensor in a Hugging Face safetensors file under the same name.

torch.distributed.pipelining needs stage modules that take and return tensors: the first stage
takes token ids (B, T) and returns hidden states (B, T, C), middle stages take and return hidden
states, the last returns logits (B, T, vocab). The loss is computed outside (by the schedule).

Tied embeddings: when the first and the last stage are different modules, the last keeps its own
copy of the tied matrix (initialised and loaded as the embedding), and both belong to the
gradient-reduction unit TIED_UNIT, held by the first and last stage of every replica: summing
its gradient over those ranks gives each copy the tied weight's one gradient, so the copies stay
equal step after step. A stage that is both first and last holds the matrix once, tied as in
transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from chipfuse.errors import ChipfuseError
from chipfuse.model.gpt import GPT, build_model, gpt_init
from chipfuse.model.spec import ModelSpec

EMBED_UNIT = "embed"
HEAD_UNIT = "head"
TIED_UNIT = "tied"


def block_unit(layer: int) -> str:
    return f"block{layer}"


class StagePart(Protocol):
    """What a stage builder reads of a plan's Stage (chipfuse.plan.plan.Stage)."""

    @property
    def layers(self) -> range: ...

    @property
    def checkpoint(self) -> str: ...


class StageModule(nn.Module):
    """Base: `pre` (embedding on stage 0), `body` (blocks, then norm and head on the last stage).

    `units()` maps a gradient-reduction unit (embed, block<i>, head, tied) to this module's
    parameter names of that unit: the ranks holding the same unit reduce its gradients together.
    """

    first: bool
    last: bool
    checkpoint_mode: str
    tied: dict[str, str]
    """Tied parameter (the head's copy) -> the parameter it is tied to (the embedding), by name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre(x))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def body(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def units(self) -> dict[str, list[str]]:
        # Every unit the stage holds is listed, even one left empty because its only matrix is the
        # tied one (a tied Llama-like embedding): the reducer lists units by the plan.
        out: dict[str, list[str]] = {}
        if self.first:
            out[EMBED_UNIT] = []
        if self.last:
            out[HEAD_UNIT] = []
        tied_names = set(self.tied) | set(self.tied.values())
        for name, _ in self.named_parameters():
            out.setdefault(TIED_UNIT if name in tied_names else self._unit_of(name), []).append(name)
        return out

    def _unit_of(self, name: str) -> str:
        raise NotImplementedError

    def _run_block(self, blk: Any, h: torch.Tensor, *extra: Any) -> torch.Tensor:
        # "selective" keeps the cheap norms' outputs in a full-recompute world: on these small
        # blocks both modes recompute the block, which is what a planner charging 1/3 extra
        # forward for selective would under-count; the cost model owns that difference.
        if self.checkpoint_mode != "none" and torch.is_grad_enabled():
            return checkpoint(blk, h, *extra, use_reentrant=False)
        return blk(h, *extra)


def put(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register `module` at `dotted` under root, creating empty containers on the way."""
    *path, leaf = dotted.split(".")
    node = root
    for p in path:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


def get(root: nn.Module, dotted: str) -> Any:
    """The submodule or parameter at `dotted`, None where a piece is absent (OPT's project_in)."""
    node: Any = root
    for p in dotted.split("."):
        node = getattr(node, p, None)
        if node is None:
            return None
    return node


# ---------------------------------------------------------------------------------- init by name
def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, full module name): the same module draws the same numbers in
    every layout, whatever else the rank builds."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    # Children before parents, as transformers initialises: a parent's rule (GPT-2's scaled
    # c_proj) overrides its children's default.
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


InitFn = Callable[[str, nn.Module], None]


@torch.no_grad()
def init_by_name(module: nn.Module, init_fn: InitFn, seed: int, *, last: tuple[str, ...] = ()) -> None:
    """Run init_fn on every submodule under a generator seeded by (seed, submodule name).

    `last`: modules initialised after all others (the embedding whose matrix the head shares:
    the tied matrix must hold the embedding's numbers, as the other stages' copies do)."""
    order = list(_post_order(module))
    order = [x for x in order if x[0] not in last] + [x for x in order if x[0] in last]
    for name, m in order:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(seed, name))
            init_fn(name, m)


def materialise(module: nn.Module, init_fn: InitFn, seed: int, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> None:
    """Allocate a meta-built module's own tensors on `device` and initialise them by name."""
    tied = getattr(module, "tied", {})
    module.to_empty(device=device)
    if dtype is not None:
        module.to(dtype)
    retie(module, tied)
    init_by_name(module, init_fn, seed, last=tuple(s.rsplit(".", 1)[0] for s in tied.values()))


def retie(module: nn.Module, tied: dict[str, str]) -> None:
    """to_empty gives each module its own new tensor: put tied parameters back to one tensor
    where the module holds both ends."""
    names = dict(module.named_parameters(remove_duplicate=False))
    for target, source in tied.items():
        if target in names and source in names:
            *path, leaf = target.split(".")
            setattr(get(module, ".".join(path)) if path else module, leaf, names[source])


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """torch.nn.init as no-ops while a model is built on the meta device: the draws would be
    thrown away, and the first one on meta costs seconds (it imports torch's reference kernels)."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS}
    try:
        for n in _INIT_FUNCTIONS:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------- built-in GPT
class GPTStage(StageModule):
    """A run of the built-in GPT's blocks (chipfuse.model.gpt.GPT)."""

    tok_emb: Any
    pos_emb: Any
    blocks: Any
    ln_f: Any
    head: Any

    def __init__(self, full: Any, stage: StagePart, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode, self.tied = first, last, stage.checkpoint, {}
        if first:
            self.tok_emb, self.pos_emb = full.tok_emb, full.pos_emb
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in stage.layers})
        if last:
            self.ln_f, self.head = full.ln_f, full.head

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:
            return x
        pos = torch.arange(x.shape[1], device=x.device)
        return self.tok_emb(x) + self.pos_emb(pos)  # (B, T) ids -> (B, T, C)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks.values():
            h = self._run_block(blk, h)
        return self.head(self.ln_f(h)) if self.last else h

    def _unit_of(self, name: str) -> str:
        top = name.split(".")[0]
        if top in ("tok_emb", "pos_emb"):
            return EMBED_UNIT
        if top in ("ln_f", "head"):
            return HEAD_UNIT
        return block_unit(int(name.split(".")[1]))


def _meta_gpt(spec: ModelSpec) -> nn.Module:
    with torch.device("meta"), no_init():
        return GPT(spec)


# ---------------------------------------------------------------------------------- any family
def build_full(spec: ModelSpec, seed: int = 0, *, init_from: str | None = None) -> nn.Module:
    """The whole model of the spec's family: the single-device reference, initialised by name
    exactly as every stage of every layout is (or loaded from `init_from`)."""
    if spec.family == "gpt":
        model: nn.Module = build_model(spec, seed)
    else:
        from chipfuse.model.hf import hf_init, meta_model

        model = meta_model(spec)
        model.tied = tied_keys(model)  # type: ignore[assignment]
        materialise(model, hf_init(model), seed)
    if init_from is not None:
        from chipfuse.model.weights import load_weights

        load_weights(model, init_from, tied=getattr(model, "tied", {}))
    return model


def has_tied_unit(spec: ModelSpec) -> bool:
    """Whether the model's first and last stage share a matrix (the built-in GPT never ties)."""
    return spec.tie_embeddings and spec.family != "gpt"


def tied_keys(model: nn.Module) -> dict[str, str]:
    """transformers' {tied parameter: its source} of a model whose config ties them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "all_tied_weights_keys", None) or {}
    return dict(keys)


def full_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of a model from build_full, whatever its family."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def build_stage(spec: ModelSpec, stages: tuple[StagePart, ...], index: int, *, seed: int = 0,
                full: nn.Module | None = None, init_from: str | None = None,
                device: str | torch.device = "cpu") -> StageModule:
    """The stage module for stages[index] of one replica.

    Built on the meta device and materialised alone (its tensors only), initialised by name with
    `seed`, then loaded from the Hugging Face folder `init_from` when given (this stage's tensors
    only). `full`: cut from an already materialised whole model instead (its tensors are shared).
    """
    first, last = index == 0, index == len(stages) - 1
    if spec.family == "gpt":
        if full is not None:
            return GPTStage(full, stages[index], first=first, last=last)
        mod: StageModule = GPTStage(_meta_gpt(spec), stages[index], first=first, last=last)
        materialise(mod, gpt_init(spec.num_layers), seed, device=device)
        if init_from is not None:
            raise ChipfuseError(f"--init-from {init_from}: the built-in GPT ({spec.name!r}) has no Hugging Face "
                                "weights. Fix: give --model the folder's config.json instead")
        return mod
    from chipfuse.model.hf import build_hf_stage

    return build_hf_stage(spec, stages[index], first=first, last=last, seed=seed, full=full,
                          init_from=init_from, device=device)
