"""The chip catalog: public specs of real chips, read from catalog.toml."""

from __future__ import annotations

import functools
from importlib import resources

import tomllib

from chipfuse.cluster.chips import Chip, GiB, chip_from_table

__all__ = ["GiB", "Chip", "load_catalog", "get_chip", "in_catalog"]


def _catalog_error(where: str, problem: str, fix: str) -> Exception:
    return ValueError(f"chipfuse/cluster/catalog.toml: {where}: {problem}. Fix: {fix}")


@functools.cache
def load_catalog() -> dict[str, Chip]:
    text = resources.files("chipfuse.cluster").joinpath("catalog.toml").read_text()
    raw = tomllib.loads(text)
    return {name: chip_from_table(name, e, name, _catalog_error) for name, e in raw.items()}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")


def get_chip(name: str) -> Chip:
    """Look a chip up by name, forgiving case, '_' and ' ', and unique prefixes ('A100' -> 'A100-SXM-80GB')."""
    cat = load_catalog()
    if name in cat:
        return cat[name]
    by_norm = {_norm(k): v for k, v in cat.items()}
    if _norm(name) in by_norm:
        return by_norm[_norm(name)]
    hits = [v for k, v in by_norm.items() if k.startswith(_norm(name))]
    if len(hits) >= 1:
        # Prefer the first listed variant (the catalog lists the flagship first).
        return hits[0]
    raise KeyError(name)


def in_catalog(name: str) -> bool:
    """Whether `name` finds a catalog chip (get_chip's forgiving look-up)."""
    try:
        get_chip(name)
    except KeyError:
        return False
    return True
