"""Chip descriptions: one reader for the catalog's tables and a pool file's own `[[chip]]` tables.

A chip table (catalog.toml `[NAME]`, or a pool file's `[[chip]]` with `name = "..."`)::

    vendor = "nvidia"           # a device kind (chipfuse.devices): nvidia | amd | huawei | intel | ... | cpu
    memory_gib = 11             # device memory
    tflops_bf16 = 107.6         # dense 16-bit matrix peak (fp16 where the chip has no bf16)
    tflops_fp32 = 13.4          # dense fp32 peak without TF32
    mem_bw_gbs = 616            # device memory bandwidth, GB/s
    link_gbs = 16               # chip-to-chip link inside a node, one direction, GB/s (PCIe if none)
    bf16 = false                # optional: the chip has no bfloat16 (trains in fp16 or fp32); default: its kind's
    tensor_cores = true         # optional: 16-bit matrix units (false: tflops_bf16 is a SIMT figure)
    source = "https://..."      # where the figures come from (required)
    note = "..."                # optional

Every field is checked: a missing or wrong one is named with the file, the field and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chipfuse.devices import DeviceKind, kind_of, vendors

GiB = 1024**3

NUMBER_FIELDS = ("memory_gib", "tflops_bf16", "tflops_fp32", "mem_bw_gbs", "link_gbs")
CHIP_FIELDS = frozenset({"name", "vendor", *NUMBER_FIELDS, "bf16", "tensor_cores", "source", "note", "link"})


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
    tensor_cores: bool = True
    """16-bit matrix units: without them a 16-bit GEMM runs on the vector units (lower efficiency)."""
    source: str = ""
    note: str = ""

    @property
    def kind(self) -> DeviceKind:
        return kind_of(self.vendor)

    def flops(self, dtype: str) -> float:
        return self.flops_fp32 if dtype == "fp32" else self.flops_bf16


Fail = Callable[[str, str, str], Exception]
"""fail(field, problem, fix) -> the error to raise (it names the file)."""


def chip_from_table(name: str, raw: Any, where: str, fail: Fail) -> Chip:
    """Check one chip table and build the Chip. `where` prefixes field names in errors."""
    if not isinstance(raw, dict):
        raise fail(where, f"is {raw!r}, not a table", "write the chip as a TOML table of its fields")
    extra = sorted(set(raw) - CHIP_FIELDS)
    if extra:
        raise fail(f"{where}.{extra[0]}", "unknown field", f"use one of {sorted(CHIP_FIELDS)}")
    vendor = raw.get("vendor")
    if vendor not in vendors():
        raise fail(f"{where}.vendor", f"is {vendor!r}", f"use one of {list(vendors())}")
    nums: dict[str, float] = {}
    for key in NUMBER_FIELDS:
        v = raw.get(key)
        if v is None:
            raise fail(f"{where}.{key}", "missing", f"add `{key} = <number>` (see `chipfuse pool catalog`)")
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v or v == float("inf"):
            raise fail(f"{where}.{key}", f"is {v!r}, must be a positive finite number", f"write `{key} = <number>`")
        nums[key] = float(v)
    if nums["tflops_fp32"] > nums["tflops_bf16"]:
        raise fail(f"{where}.tflops_fp32", f"is {nums['tflops_fp32']:g}, above tflops_bf16 = {nums['tflops_bf16']:g}",
                   "give the dense 16-bit matrix peak in tflops_bf16 (at least the fp32 figure)")
    # A chip table that says nothing of bfloat16 gets its kind's answer (chipfuse.devices).
    flags = {"bf16": "bf16" in kind_of(vendor).dtypes, "tensor_cores": True}
    for key in ("bf16", "tensor_cores"):
        v = raw.get(key, flags[key])
        if not isinstance(v, bool):
            raise fail(f"{where}.{key}", f"is {v!r}, not true or false", f"write `{key} = true` or `false`")
        flags[key] = v
    src = raw.get("source")
    if not isinstance(src, str) or not src.strip():
        raise fail(f"{where}.source", "missing" if src is None else f"is {src!r}",
                   'say where the figures come from: `source = "https://..."`')
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise fail(f"{where}.note", f"is {note!r}, not a string", 'write `note = "..."`')
    return Chip(name=name, vendor=vendor, memory_bytes=int(nums["memory_gib"] * GiB),
                flops_bf16=nums["tflops_bf16"] * 1e12, flops_fp32=nums["tflops_fp32"] * 1e12,
                mem_bw=nums["mem_bw_gbs"] * 1e9, link_bw=nums["link_gbs"] * 1e9, has_bf16=flags["bf16"],
                tensor_cores=flags["tensor_cores"], source=src, note=note)


def pool_chips(raw: Any, fail: Fail, known: Callable[[str], bool]) -> dict[str, Chip]:
    """A pool file's `[[chip]]` tables, by name. A name may not shadow a catalog chip (`known`)."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise fail("chip", "is not an array of tables", 'write each chip as `[[chip]]` with `name = "..."`')
    out: dict[str, Chip] = {}
    for i, c in enumerate(raw):
        where = f"chip[{i}]"
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name:
            raise fail(f"{where}.name", "missing" if name is None else f"is {name!r}", 'add `name = "..."`')
        if name in out:
            raise fail(f"{where}.name", f"duplicate chip {name!r}", "give every [[chip]] its own name")
        if known(name):
            raise fail(f"{where}.name", f"{name!r} is a catalog chip",
                       "give your chip another name (or use the catalog's entry: `chipfuse pool catalog`)")
        out[name] = chip_from_table(name, c, where, fail)
    return out
