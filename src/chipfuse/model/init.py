"""Module trees built on the meta device, materialised and initialised by name.

Every layout starts from the same weights because each module is initialised from a generator
seeded by (seed, the module's full name), never by the order modules happen to be built in:
stage 2 of a 3-stage split and the single-device reference draw the same numbers for
`model.layers.5.mlp.up_proj`. Family-free: the built-in GPT, transformers' models and a test's
own family all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn


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
