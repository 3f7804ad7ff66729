"""Each memory strategy trains the same model as the plain run, applied as the trainer applies it
(runtime.parallel.parallelize through runtime.measure.memory_probe).

Single-process strategies run in this process; the sharded ones share one start of 2 gloo ranks
(a start costs seconds here). Tolerances, and why:
- checkpointing: exact (0). The recompute runs the same ops on the same inputs.
- FSDP2 sharding: gradients within 1e-6 absolute: the same maths, but gradients are summed over
  ranks by a reduce-scatter instead of inside one backward, so fp32 additions happen in another order.
- bf16 compute: loss within 2e-3 relative: bf16 keeps 8 bits of mantissa (relative error 4e-3 per
  rounding), and most of the error averages out in a sum over many tokens.
- optimizer state: the first update is exact (torchao updates from the fp32 moments before storing
  them quantised); afterwards the moments carry quantisation error. Over 6 steps: bf16 state 1e-4,
  int8 1e-3, int4 3e-2 relative loss difference (4-bit moments are coarse).
"""

from __future__ import annotations

import pytest
import torch

from chipfuse.model.spec import ModelSpec
from chipfuse.plan.memory import Strategy
from chipfuse.runtime.measure.memory_probe import ProbeResult, run_probe, spawn_probe

SPEC = ModelSpec(name="tiny4", num_layers=4, dim=64, num_heads=4, vocab_size=256, seq_len=32)
RUN = {"spec": SPEC, "global_batch": 4, "seq_len": 32, "cap_bytes": None, "lr": 3e-3}


def _run(cfg: Strategy, steps: int = 3, want_grads: bool = True) -> ProbeResult:
    torch.set_num_threads(1)
    res = run_probe(cfg=cfg, steps=steps, want_grads=want_grads, **RUN)
    assert res.error is None, res.error
    return res


@pytest.fixture(scope="module")
def plain() -> ProbeResult:
    return _run(Strategy(), steps=6)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_is_exact(plain: ProbeResult, mode: str) -> None:
    res = _run(Strategy(checkpoint=mode), steps=6)
    assert res.losses == plain.losses
    assert res.grads is not None and plain.grads is not None and res.grads.keys() == plain.grads.keys()
    for name, g in plain.grads.items():
        torch.testing.assert_close(res.grads[name], g, rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_fewer_activations() -> None:
    # A batch large enough that saved activations, not the state after the update, make the peak.
    peaks = {mode: run_probe(cfg=Strategy(checkpoint=mode), steps=1, **{**RUN, "global_batch": 16}).peak_bytes
             for mode in ("none", "selective", "full")}
    assert peaks["full"] < peaks["selective"] < peaks["none"]


@pytest.mark.parametrize(("opt_dtype", "rtol"), [("bf16", 1e-4), ("int8", 1e-3), ("int4", 3e-2)])
def test_low_precision_optimizer_state(plain: ProbeResult, opt_dtype: str, rtol: float) -> None:
    res = _run(Strategy(optimizer_dtype=opt_dtype), steps=6, want_grads=False)
    assert res.losses[:2] == pytest.approx(plain.losses[:2], rel=1e-6)  # the first update is exact
    assert res.losses == pytest.approx(plain.losses, rel=rtol)
    assert res.losses[-1] < res.losses[0]
    # Less state on the device: torchao's quantised moments are counted as their codes and scales.
    assert res.static_bytes < plain.static_bytes


def test_bf16_compute_keeps_fp32_master_weights(plain: ProbeResult) -> None:
    res = _run(Strategy(dtype="bf16"), steps=6, want_grads=False)
    assert res.losses == pytest.approx(plain.losses, rel=2e-3)
    assert res.losses != plain.losses  # bf16 really ran
    assert res.static_bytes == plain.static_bytes  # fp32 parameters, gradients and state


def test_emulated_optimizer_offload_changes_nothing_but_the_count(plain: ProbeResult) -> None:
    res = _run(Strategy(offload="optimizer"), steps=6, want_grads=False)
    assert res.losses == plain.losses
    n_params = sum(g.numel() for g in plain.grads.values())
    # fp32 AdamW state is 8 bytes per parameter; it lives in host memory now.
    assert plain.static_bytes - res.static_bytes == 8 * n_params


def test_offload_on_a_cpu_device_is_refused() -> None:
    res = run_probe(cfg=Strategy(offload="params"), host_is_device=True, steps=1, **RUN)
    assert res.error is not None and res.error.startswith("refused:")
    assert "host memory" in res.error and "Fix:" in res.error


SHARDED = [
    Strategy(shard="full"),
    Strategy(shard="grads"),
    Strategy(shard="full", offload="params"),
    Strategy(shard="full", checkpoint="full"),
    Strategy(shard="full", dtype="bf16"),
    Strategy(shard="full", optimizer_dtype="int8"),
]


@pytest.fixture(scope="module")
def sharded() -> list[list[ProbeResult]]:
    res = spawn_probe(2, cfgs=SHARDED, steps=3, want_grads=True, **RUN)
    for cfg, ranks in zip(SHARDED, res, strict=True):
        for r in ranks:
            assert r.error is None, (cfg, r.error)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_fsdp2_sharding_matches_one_device(plain: ProbeResult, sharded, i: int) -> None:
    ranks = sharded[i]
    assert ranks[0].losses == ranks[1].losses  # every rank reports the group's loss
    assert ranks[0].losses == pytest.approx(plain.losses[:3], rel=1e-6, abs=0)
    for name, g in plain.grads.items():
        torch.testing.assert_close(ranks[0].grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_bf16_and_int8(plain: ProbeResult, sharded) -> None:
    bf16, int8 = sharded[4][0], sharded[5][0]
    assert bf16.losses == pytest.approx(plain.losses[:3], rel=2e-3)
    assert int8.losses == pytest.approx(plain.losses[:3], rel=1e-3)


def test_meter_counts_local_shards_and_leaves_offloaded_state_out(plain: ProbeResult, sharded) -> None:
    full, grads, offload, ckpt, _, int8 = (s[0] for s in sharded)
    # Two ranks: each holds half of every parameter, gradient and moment (dim-0 shards, no padding
    # here: every dim-0 size of this model is even).
    assert full.static_bytes == plain.static_bytes // 2
    assert grads.static_bytes == full.static_bytes  # at rest both are sharded; they differ in flight
    assert grads.peak_bytes > full.peak_bytes  # reshard_after_forward=False keeps parameters gathered
    assert offload.static_bytes == 0  # parameters, gradients and optimizer state are in host memory
    assert 0 < offload.peak_bytes < full.peak_bytes
    assert ckpt.peak_bytes < full.peak_bytes
    assert int8.static_bytes < full.static_bytes
