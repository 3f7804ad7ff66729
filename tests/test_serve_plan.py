"""The inference planner (pure): every layer placed once, memory within capacity, never slower when a
device is added, slow devices left out with a reason, and the simple splits beside it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import PlanError
from chipfuse.model.spec import SPEC_PRESETS, ModelSpec
from chipfuse.plan.serve import ServePlan, plan_serve, predict_serve, split_by_memory, split_even

LLAMA = ModelSpec(name="t", family="llama", num_layers=8, dim=512, num_heads=8, num_kv_heads=2, ffn_dim=1024,
                  vocab_size=1000, seq_len=2048)


def pool_of(devs: list[tuple[float, float]]):
    """Emulated devices of (speed, memory MiB) on one node."""
    return pool_from_dict({"name": "p", "node": [{"name": "h", "device": [
        {"name": f"d{i}", "chip": "cpu", "emulate": {"speed": s, "memory_gib": m / 1024}}
        for i, (s, m) in enumerate(devs)]}]})


device = st.tuples(st.sampled_from([0.1, 0.25, 0.5, 1.0]), st.sampled_from([8.0, 16.0, 40.0, 200.0]))


@settings(max_examples=40, deadline=None)
@given(devs=st.lists(device, min_size=1, max_size=4), extra=device, concurrency=st.sampled_from([1, 4]))
def test_layers_placed_once_within_memory_and_adding_a_device_never_slows(devs, extra, concurrency):
    try:
        before = plan_serve(pool_of(devs), LLAMA, context_len=256, concurrency=concurrency, dtype="bf16")
    except PlanError:
        before = None
    after = plan_serve(pool_of([*devs, extra]), LLAMA, context_len=256, concurrency=concurrency, dtype="bf16") \
        if before is not None else None
    for res, n in ((before, len(devs)), (after, len(devs) + 1)):
        if res is None:
            continue
        plan, pred = res.best.plan, res.best.prediction
        covered = [layer for s in plan.stages for layer in s.layers]
        assert covered == list(range(LLAMA.num_layers))  # every layer exactly once, in order
        assert all(s.memory_bytes <= s.capacity_bytes for s in pred.stages)
        assert pred.decode_tokens_per_s > 0 and pred.ttft_s > 0
        # Every device is either used or left out with a reason.
        assert sorted([*plan.devices, *(e.device for e in plan.excluded)]) == sorted(f"d{i}" for i in range(n))
        assert all(e.reason for e in plan.excluded)
        # JSON round trip: a person can write the same plan by hand.
        assert ServePlan.from_dict(plan.to_dict()) == plan
    if before is not None and after is not None:
        qb = sum(s.weight_dtype != "bf16" for s in before.best.plan.stages)
        qa = sum(s.weight_dtype != "bf16" for s in after.best.plan.stages)
        if qb == qa == 0:  # (a device that removes the need to quantise may trade speed for full precision)
            assert after.best.prediction.decode_tokens_per_s >= before.best.prediction.decode_tokens_per_s * (1 - 1e-9)


def test_slow_device_left_out_with_reason_and_baselines_slower():
    # A fast small device and a big slow one: memory-proportional puts most layers on the slow one.
    pool = pool_of([(1.0, 100.0), (1.0, 100.0), (0.1, 2000.0)])
    res = plan_serve(pool, LLAMA, context_len=256, concurrency=8, dtype="bf16")
    assert "d2" not in res.best.plan.devices
    (ex,) = res.best.plan.excluded
    assert ex.device == "d2" and "only slows the job" in ex.reason
    speed = res.to_dict()["speedup"]
    assert speed["memory-proportional"] > 1.3 and speed["even"] > 1.0


def test_quantises_only_where_memory_forces_it():
    # 8 layers of ~2.1 MB at bf16; two devices too small for bf16 together, big enough at int8.
    pool = pool_of([(1.0, 12.0), (0.5, 12.0)])
    res = plan_serve(pool, LLAMA, context_len=64, concurrency=1, dtype="bf16")
    wds = [s.weight_dtype for s in res.best.plan.stages]
    assert "int8" in wds or "int4" in wds
    roomy = plan_serve(pool_of([(1.0, 400.0)]), LLAMA, context_len=64, concurrency=1, dtype="bf16")
    assert [s.weight_dtype for s in roomy.best.plan.stages] == ["bf16"]
    with pytest.raises(PlanError, match="does not fit"):
        plan_serve(pool_of([(1.0, 1.0)]), LLAMA, context_len=64, concurrency=1, dtype="bf16")


def test_kv_cache_grows_with_context_and_concurrency():
    pool = pool_of([(1.0, 400.0)])
    small = plan_serve(pool, LLAMA, context_len=128, concurrency=1, prompt_tokens=64).best.prediction
    big = plan_serve(pool, LLAMA, context_len=1024, concurrency=8, prompt_tokens=64).best.prediction
    # 8 layers x 2 (k, v) x 2 kv heads x 64 dims x 2 bytes per token = 4 KiB per token per request,
    # plus 7 more requests' fp32 logits (1000 x 4 bytes) on the last stage.
    kv = (1024 * 8 - 128) * 8 * 2 * 128 * 2
    assert big.stages[0].memory_bytes - small.stages[0].memory_bytes == kv + 7 * 1000 * 4


def test_simple_splits_and_hand_written_plan_checked():
    assert split_even(10, ["a", "b", "c"]) == [4, 3, 3]
    assert split_by_memory(12, {"a": 3, "b": 1}) == [9, 3]
    pool = pool_of([(1.0, 400.0), (0.5, 400.0)])
    plan = plan_serve(pool, SPEC_PRESETS["small"], context_len=64, concurrency=2, dtype="fp32").best.plan
    bad = {**plan.to_dict(), "stages": [{**plan.to_dict()["stages"][0], "num_layers": 1}]}
    with pytest.raises(PlanError, match="cover 1 layers"):
        ServePlan.from_dict(bad, source="hand.json")
    with pytest.raises(PlanError, match="not in pool"):
        predict_serve(plan, pool_of([(1.0, 400.0)]).subset([]) if False else pool_from_dict(
            {"node": [{"name": "h", "device": [{"name": "zz", "chip": "cpu"}]}]}))


def test_plan_serve_command_and_bad_model_folders(tmp_path, capsys):
    import json

    from chipfuse.cli import main

    out = tmp_path / "p.json"
    assert main(["plan", "--serve", "--pool", "examples/amp-v100-t4.toml", "--model", "llama-13b", "--context-len",
                 "2048", "--concurrency", "4", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["baselines"]) == {"even", "memory-proportional"} and got["speedup"]["memory-proportional"] >= 1.0
    ServePlan.from_dict(got["plan"])  # what --serve-plan reads back
    capsys.readouterr()
    for cmd in (["generate", "--prompt", "hi"], ["serve"]):
        assert main([*cmd, "--model", str(tmp_path)]) == 2  # no config.json: one line, nothing started
        err = capsys.readouterr().err.strip()
        assert "config.json" in err and "Fix:" in err and len(err.splitlines()) == 1
