"""The chip catalog: public specs of real chips, read from catalog.toml."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import tomllib

GiB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Chip:
    """One kind of chip, with dense peak figures (no sparsity)."""

    name: str
    vendor: str
    memory_bytes: int
    """Device memory."""
    flops_bf16: float
    """Peak dense bf16 (or fp16 where `has_bf16` is false) FLOP/s."""
    flops_fp32: float
    """Peak dense fp32 FLOP/s (no TF32)."""
    mem_bw: float
    """Device memory bandwidth, bytes/s."""
    link_bw: float
    """Chip-to-chip bandwidth inside a node, one direction, bytes/s."""
    has_bf16: bool = True
    source: str = ""
    note: str = ""

    def flops(self, dtype: str) -> float:
        return self.flops_fp32 if dtype == "fp32" else self.flops_bf16


@functools.cache
def load_catalog() -> dict[str, Chip]:
    text = resources.files("chipfuse.cluster").joinpath("catalog.toml").read_text()
    raw = tomllib.loads(text)
    return {
        name: Chip(
            name=name,
            vendor=e["vendor"],
            memory_bytes=int(e["memory_gib"] * GiB),
            flops_bf16=e["tflops_bf16"] * 1e12,
            flops_fp32=e["tflops_fp32"] * 1e12,
            mem_bw=e["mem_bw_gbs"] * 1e9,
            link_bw=e["link_gbs"] * 1e9,
            has_bf16=e.get("bf16", True),
            source=e["source"],
            note=e.get("note", ""),
        )
        for name, e in raw.items()
    }


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
