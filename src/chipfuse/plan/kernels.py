"""What one transformer block costs on one chip, kernel by kernel, from public specs.

Pure arithmetic: the model's shape, the chip's peaks and a few global calibration parameters in,
seconds out. Used by the cost model (plan.cost.block_time) when no measured profile gives the time.

Terms, for m tokens on a device, tensor-parallel degree t, compute dtype w bytes:

- GEMMs (q/k/v, output projection, MLP up (gate+up for SwiGLU) and down, sharded by t): each
  m x n x k GEMM takes  max(2mnk / (peak x eff x fill), w (mk + kn + mn) / mem_bw) + launch, with
  eff the large-GEMM fraction of peak for the dtype (tensor cores, fp32 on vector units, or 16-bit
  without tensor cores) and fill = mn / (mn + MN_HALF x peak TFLOP/s): small outputs leave
  multiprocessors idle (bigger chips need bigger matrices to fill). Backward runs the two GEMMs of
  each forward one with their own shapes (data gradient m x k x n, weight gradient k x n x m), so
  the backward/forward ratio comes from the shapes, not a fixed 2.
- attention core (fused SDPA / flash, causal: half the s x s work): forward 2 s h m / t FLOPs at
  `attn_eff` of the GEMM rate; backward 2.5 x forward (flash recomputes the scores).
- memory-bound element-wise work (norms, residual adds, activation function, dropout, RoPE):
  (ELEM_H h + ELEM_F f) w bytes per token forward, twice that backward, at memory bandwidth.
- per-block overhead (kernel launches, framework hooks): `layer_overhead_s` forward, twice backward.
- the head: an m x V/t x h GEMM plus the loss's softmax over m x V fp32 values.

The calibration parameters are global (one value per term, never per chip or per run). Their
values live in plan/calibration.toml, fitted on half of the published runs by
`benchmarks/prediction.py --fit` (docs/planner.md); the held-out error of those values is the
expected error band that `chipfuse plan` prints.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

import tomllib

from chipfuse.model.costs import DTYPE_BYTES
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec

ELEM_H = 24.0
"""Element-wise bytes per token per block forward, in units of h x w (two norms read+write 4h, two
residual adds 6h, dropout masks and RoPE on q/k, bias adds: about 24h)."""
ELEM_F = 4.0
"""... and in units of f x w (activation function read + write, SwiGLU's product)."""


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Global parameters of the kernel model (fitted on published runs, see module docstring)."""

    gemm_eff_tc: float = 0.80
    """Large-GEMM fraction of the 16-bit tensor-core peak."""
    gemm_eff_fp32: float = 0.75
    """Large-GEMM fraction of the fp32 (vector unit) peak."""
    gemm_eff_no_tc: float = 0.60
    """16-bit GEMMs on chips without matrix units, as a fraction of their 16-bit peak."""
    other_vendor: float = 0.80
    """Software maturity of non-NVIDIA stacks: a factor on every efficiency."""
    mn_half: float = 2048.0
    """GEMM output elements per peak TFLOP/s at which a GEMM reaches half its large-GEMM rate."""
    attn_eff: float = 0.60
    """Fused attention's rate as a fraction of the GEMM rate."""
    layer_overhead_s: float = 60e-6
    """Per block forward: kernel launches and framework hooks (backward twice)."""
    elem_eff: float = 0.70
    """Fraction of memory bandwidth that element-wise kernels reach."""

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@functools.cache
def calibration_file() -> dict[str, Any]:
    """plan/calibration.toml: [parameters] and the held-out [error] of `benchmarks/prediction.py`."""
    try:
        text = resources.files("chipfuse.plan").joinpath("calibration.toml").read_text()
    except FileNotFoundError:
        return {}
    return tomllib.loads(text)


_override: Calibration | None = None


def set_calibration(cal: Calibration | None) -> None:
    """Use `cal` instead of plan/calibration.toml's parameters (None: back to the file). For fitting."""
    global _override
    _override = cal


def default_calibration() -> Calibration:
    if _override is not None:
        return _override
    params = calibration_file().get("parameters", {})
    known = {f.name for f in fields(Calibration)}
    return replace(Calibration(), **{k: float(v) for k, v in params.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class ChipRates:
    """What the kernel model needs of a device (cluster.Chip, scaled for an emulated one)."""

    peak_flops: float
    """Dense peak in the compute dtype."""
    mem_bw: float
    tensor_cores: bool = True
    nvidia: bool = True


def gemm_eff(chip: ChipRates, dtype: str, cal: Calibration) -> float:
    if dtype == "fp32":
        eff = cal.gemm_eff_fp32
    else:
        eff = cal.gemm_eff_tc if chip.tensor_cores else cal.gemm_eff_no_tc
    return eff * (1.0 if chip.nvidia else cal.other_vendor)


def gemm_s(m: float, n: float, k: float, chip: ChipRates, dtype: str, cal: Calibration) -> float:
    """Seconds of one m x n x k GEMM (module docstring); never below its memory traffic."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    fill = m * n / (m * n + cal.mn_half * chip.peak_flops / 1e12)
    compute = 2 * m * n * k / (chip.peak_flops * gemm_eff(chip, dtype, cal) * fill)
    traffic = DTYPE_BYTES[dtype] * (m * k + k * n + m * n) / chip.mem_bw
    return max(compute, traffic)


def _block_gemms(spec: ModelSpec, t: int) -> list[tuple[float, float]]:
    """(n, k) of the block's forward GEMMs on one of t tensor-parallel ranks."""
    h, f = spec.dim, spec.ffn
    kv = spec.kv_heads * (h // spec.num_heads)
    up = (2 if family_of(spec).gated_mlp_kernels else 1) * f
    return [((h + 2 * kv) / t, h), (h, h / t), (up / t, h), (h, f / t)]


@dataclass(frozen=True, kw_only=True)
class BlockKernels:
    fwd_s: float
    bwd_s: float
    head_fwd_s: float
    head_bwd_s: float


def block_kernels(spec: ModelSpec, seq_len: int, tokens: int, chip: ChipRates, *, dtype: str, tp: int = 1,
                  cal: Calibration | None = None) -> BlockKernels:
    """Forward and backward seconds of one block and of the head for `tokens` tokens on one device."""
    cal = cal or default_calibration()
    m, t, w = float(tokens), tp, DTYPE_BYTES[dtype]
    fwd = bwd = 0.0
    for n, k in _block_gemms(spec, t):
        fwd += gemm_s(m, n, k, chip, dtype, cal)
        bwd += gemm_s(m, k, n, chip, dtype, cal) + gemm_s(k, n, m, chip, dtype, cal)
    rate = chip.peak_flops * gemm_eff(chip, dtype, cal) * cal.attn_eff
    attn_f = 2 * seq_len * spec.dim * m / t / rate
    fwd += attn_f
    bwd += 2.5 * attn_f
    elem = (ELEM_H * spec.dim + ELEM_F * spec.ffn / t) * w * m / (chip.mem_bw * cal.elem_eff)
    fwd += elem + cal.layer_overhead_s
    bwd += 2 * elem + 2 * cal.layer_overhead_s
    V = spec.vocab_size
    head_f = gemm_s(m, V / t, spec.dim, chip, dtype, cal) + 3 * 4 * m * V / t / (chip.mem_bw * cal.elem_eff)
    head_b = gemm_s(m, spec.dim, V / t, chip, dtype, cal) + gemm_s(spec.dim, V / t, m, chip, dtype, cal)
    return BlockKernels(fwd_s=fwd, bwd_s=bwd, head_fwd_s=head_f, head_bwd_s=head_b)


def sustained_fraction(chip: ChipRates, dtype: str, cal: Calibration | None = None) -> float:
    """Large-GEMM efficiency: what a device sustains on big blocks, as a fraction of peak (for ranking
    devices and dealing shares; the block time itself comes from block_kernels)."""
    return gemm_eff(chip, dtype, cal or default_calibration())


def expected_error() -> dict[str, Any]:
    """The held-out errors of the calibrated model on published runs (plan/calibration.toml [error]):
    the band `chipfuse plan` prints beside its prediction. Empty when no calibration was written."""
    err = dict(calibration_file().get("error", {}))
    if err:
        err["data"] = "benchmarks/data/published_runs.toml"
    return err
