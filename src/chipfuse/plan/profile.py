"""Measured figures that override the catalog's: the planner's bridge to reality.

`chipfuse profile` fills one by measurement; the cost model uses it when given, else catalog
peak x a documented efficiency (chipfuse.plan.rates).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

from chipfuse import validate
from chipfuse.cluster.wiring import log_interp
from chipfuse.errors import ChipfuseError


@dataclass(frozen=True, kw_only=True)
class LayerTiming:
    """Measured seconds of one transformer block for one micro-batch on one device."""

    micro_batch_size: validate.Count
    seq_len: validate.Count
    fwd_s: validate.Positive
    bwd_s: validate.Positive


@dataclass(frozen=True, kw_only=True)
class LinkMeasure:
    """Measured one-direction bandwidth and latency between two nodes (a == b: inside a node)."""

    a: str
    b: str
    bandwidth: validate.Positive
    """Bytes/s."""
    latency_s: float
    curve: tuple[tuple[float, float], ...] = ()
    """(message bytes, bytes/s) measured at several sizes (cluster.wiring's curve); empty: `bandwidth` at all."""


@dataclass(frozen=True, kw_only=True)
class Profile:
    flops: dict[str, dict[str, validate.Positive]] = field(default_factory=dict)
    """device name -> dtype -> sustained FLOP/s on transformer blocks."""
    layer_times: dict[str, tuple[LayerTiming, ...]] = field(default_factory=dict)
    """device name -> measured block timings (scaled linearly in tokens to other shapes)."""
    links: tuple[LinkMeasure, ...] = ()
    gemm: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """device name -> (GEMM size n of an n x n x n product, FLOP/s) measured: the efficiency curve."""
    runtime_bytes: dict[str, Annotated[int, validate.Range(0, 1 << 50)]] = field(default_factory=dict)
    """device name -> memory the runtime itself holds there (context, BLAS workspaces, communication
    buffers), measured; replaces plan.memory's default for that device in predict()'s fit check."""
    source: str = ""
    emulated: bool = False
    """True when measured on emulated devices (figures then describe the emulation)."""

    def sustained_flops(self, device: str, dtype: str) -> float | None:
        return self.flops.get(device, {}).get(dtype)

    def layer_time(self, device: str, tokens: int) -> tuple[float, float] | None:
        """(fwd_s, bwd_s) of one block for `tokens` tokens, from the closest measured shape."""
        ts = self.layer_times.get(device)
        if not ts:
            return None
        best = min(ts, key=lambda t: abs(t.micro_batch_size * t.seq_len - tokens))
        scale = gemm_scale(self.gemm.get(device, ()), best.micro_batch_size * best.seq_len, tokens)
        return best.fwd_s * scale, best.bwd_s * scale

    def link(self, node_a: str, node_b: str) -> LinkMeasure | None:
        for ln in self.links:
            if {ln.a, ln.b} == {node_a, node_b}:
                return ln
        return None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, source: str = "<profile>") -> Profile:
        """A profile from its JSON form, every field checked by type and range (chipfuse.validate).
        Extra top-level keys are allowed: `chipfuse profile --json` adds some for people and reports."""
        kwargs = validate.fields(cls, d, source=source, open=True)
        kwargs.setdefault("source", source)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise ChipfuseError(f"{p}: no such profile. Fix: measure one with `chipfuse profile --json {p}`") from None
        except OSError as e:
            raise ChipfuseError(f"{p}: cannot read ({e.strerror}). Fix: give the path of a profile JSON") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ChipfuseError(f"{p}: not valid JSON ({e}). Fix: correct the syntax there") from None
        return cls.from_dict(raw, source=str(p))


def gemm_scale(curve: tuple[tuple[float, float], ...], measured_tokens: float, tokens: float) -> float:
    """How a block time measured at `measured_tokens` scales to `tokens`: linearly in the work, and by the
    measured GEMM rate at each size (the tokens are a GEMM's m dimension) when the profile has the curve."""
    scale = tokens / measured_tokens
    if len(curve) >= 2:
        scale *= log_interp(curve, measured_tokens) / log_interp(curve, tokens)
    return scale


def emulation_profile(plan: object, pool: object, *, unit_s: float, slack: float = 1.1) -> Profile:
    """What emulated devices really are: this host's CPU thread (`unit_s` seconds per sample, measured)
    slowed to each device's speed and padded by `slack` (docs/emulation.md). The catalog's figures
    for the chip an emulated device is named after say nothing about that, so predictions for an
    emulated pool use this instead. (plan: Plan; pool: Pool.)"""
    from chipfuse.model.costs import model_costs

    costs = model_costs(plan.model, plan.seq_len)  # type: ignore[attr-defined]
    flops_per_sample = costs.model_flops_per_token() * plan.seq_len  # type: ignore[attr-defined]
    flops = {}
    for d in pool.devices:  # type: ignore[attr-defined]
        if d.emulation:
            rate = flops_per_sample * d.emulation.speed / (slack * unit_s)
            flops[d.name] = {"fp32": rate, "bf16": rate}
    return Profile(flops=flops, emulated=True,
                   source=f"emulation: host thread {unit_s * 1e3:.2f} ms/sample x speed / {slack}")
