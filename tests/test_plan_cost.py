"""The cost model: memory formulas, predictions and their breakdown, profiles."""

import dataclasses

import pytest

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.model.costs import model_costs
from chipfuse.model.spec import SPEC_PRESETS, ModelSpec
from chipfuse.plan.cost import predict
from chipfuse.plan.memory import StageShape, stage_memory, state_bytes
from chipfuse.plan.plan import Plan, Replica, Stage, data_parallel_plan
from chipfuse.plan.profile import LayerTiming, LinkMeasure, Profile

MODEL = ModelSpec(name="m", family="llama", num_layers=4, dim=512, num_heads=8, num_kv_heads=4, ffn_dim=1024,
                  vocab_size=256, seq_len=128)


def pool(chips=("A100", "V100"), gbit=100, speed=None):
    devs = [{"name": f"d{i}", "chip": c, **({"emulate": {"speed": speed}} if speed else {})} for i, c in enumerate(chips)]
    return pool_from_dict({"name": "p", "node": [{"name": "n0", "device": devs}],
                           "default_link": {"bandwidth_gbit_s": gbit, "latency_ms": 0.01}})


def test_state_bytes_per_parameter():
    assert state_bytes("bf16", "fp32").total == 16  # 2 weights + 2 grads + 4 master + 8 Adam (ZeRO paper)
    assert state_bytes("fp32", "fp32").total == 16
    assert state_bytes("bf16", "int8").total == 10
    assert state_bytes("bf16", "int4").total == 9


def test_memory_strategies_shrink_what_they_should():
    c = model_costs(SPEC_PRESETS["llama-7b"], 2048)

    def mem(**kw):
        base = dict(num_layers=8, is_first=False, is_last=False, group_size=4, micro_batch_size=4, in_flight=2)
        return stage_memory(c, StageShape(**{**base, **kw}), dtype="bf16", optimizer_dtype="fp32")

    plain = mem()
    assert mem(shard="optimizer").optimizer == pytest.approx(plain.optimizer / 4)
    assert mem(shard="grads").grads == pytest.approx(plain.grads / 4)
    assert mem(shard="full").weights == pytest.approx(plain.weights / 4)
    assert mem(offload="optimizer").optimizer == 0
    assert mem(offload="params").weights == 0 and mem(offload="params").transient > 0
    assert mem(checkpoint="full").activations < mem(checkpoint="selective").activations < plain.activations
    assert mem(tp=4).weights == pytest.approx(plain.weights / 4)
    assert mem(in_flight=4).activations == pytest.approx(2 * plain.activations)
    last = stage_memory(c, StageShape(num_layers=8, is_first=False, is_last=True, group_size=1), dtype="bf16",
                        optimizer_dtype="fp32")
    mid = stage_memory(c, StageShape(num_layers=8, is_first=False, is_last=False, group_size=1), dtype="bf16",
                       optimizer_dtype="fp32")
    assert last.activations > mid.activations  # logits of the last stage are counted
    assert mem(shard="full").total < mem(shard="optimizer").total < plain.total


def test_prediction_has_figures_memory_and_breakdown():
    p = pool()
    plan = data_parallel_plan(MODEL, {"d0": 12, "d1": 4}, seq_len=128, micro_batch_size=4)
    pred = predict(plan, p)
    assert pred.tokens_per_s == pytest.approx(16 * 128 / pred.step_s)
    assert 0 < pred.mfu < 1
    assert set(pred.memory_bytes) == {"d0", "d1"} and pred.fits
    b = pred.breakdown
    assert {"pipeline_s", "sync_exposed_s", "replicas", "over_capacity", "peak_flops"} <= set(b)
    st = b["replicas"][0]["stages"][0]
    # Backward from the GEMM shapes (data and weight gradients) and flash attention: about 2x, not fixed.
    assert st["fwd_s"] > 0 and 1.7 * st["fwd_s"] < st["bwd_s"] < 2.8 * st["fwd_s"]
    assert st["memory"]["total"] == pred.memory_bytes["d0"]


def test_faster_chip_and_profile_speed_change_predictions():
    plan = data_parallel_plan(MODEL, {"d0": 8, "d1": 8}, seq_len=128, micro_batch_size=4)
    base = predict(plan, pool())
    # The V100 is the slow replica: giving it a measured rate (fp32: the plan's dtype) 4x its default
    # shortens the step; a figure for another dtype changes nothing.
    assert predict(plan, pool(), Profile(flops={"d1": {"bf16": 1e15}})).step_s == base.step_s
    fast = Profile(flops={"d1": {"fp32": 4 * 15.7e12 * 0.6}})
    assert predict(plan, pool(), fast).step_s < base.step_s
    slow_emulated = predict(plan, pool(speed=0.5))
    assert slow_emulated.step_s > base.step_s
    # Measured block times are used as they are.
    timed = Profile(layer_times={"d0": (LayerTiming(micro_batch_size=4, seq_len=128, fwd_s=1.0, bwd_s=2.0),)})
    rep = predict(plan, pool(), timed).breakdown["replicas"][0]
    assert rep["stages"][0]["fwd_s"] == pytest.approx(4 * 1.0, rel=0.01)  # per micro-batch: 4 blocks, + the head


def test_profile_json_round_trip(tmp_path):
    prof = Profile(flops={"a": {"bf16": 1e14}}, links=(LinkMeasure(a="n0", b="n1", bandwidth=1e9, latency_s=1e-4),),
                   layer_times={"a": (LayerTiming(micro_batch_size=1, seq_len=64, fwd_s=0.1, bwd_s=0.2),)},
                   emulated=True)
    path = tmp_path / "prof.json"
    prof.save(path)
    assert Profile.load(path) == dataclasses.replace(prof, source=prof.source)
    assert Profile.load(path).layer_time("a", 128) == pytest.approx((0.2, 0.4))


def test_slow_links_slow_the_gradient_sync_between_nodes():
    def two_nodes(gbit):
        return pool_from_dict({"name": "p", "default_link": {"bandwidth_gbit_s": gbit, "latency_ms": 0.01},
                               "node": [{"name": f"n{i}", "device": [{"name": f"d{i}", "chip": "A100"}]}
                                        for i in range(2)]})

    plan = data_parallel_plan(MODEL, {"d0": 8, "d1": 8}, seq_len=128, micro_batch_size=8)
    assert predict(plan, two_nodes(1)).step_s > predict(plan, two_nodes(400)).step_s


def test_memory_per_device_matches_the_prediction():
    from chipfuse.plan.cost import memory_per_device

    plan = data_parallel_plan(MODEL, {"d0": 12, "d1": 4}, seq_len=128, micro_batch_size=4)
    assert memory_per_device(plan, pool()) == predict(plan, pool()).memory_bytes


def test_memory_over_capacity_is_reported():
    tiny = pool_from_dict({"name": "t", "node": [{"name": "n", "device": [{"name": "d0", "chip": "T4", "memory_gib": 0.05}]}]})
    plan = Plan(model=MODEL, global_batch=8, seq_len=128, replicas=(Replica(
        stages=(Stage(devices=("d0",), first_layer=0, num_layers=4),), batch_share=8, micro_batch_size=8),))
    pred = predict(plan, tiny)
    assert not pred.fits and pred.breakdown["over_capacity"]["d0"] > 0


def test_profile_and_plan_refusals(tmp_path):
    from chipfuse.errors import ChipfuseError, PlanError

    with pytest.raises(ChipfuseError, match="no such profile.*Fix"):
        Profile.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ChipfuseError, match="not valid JSON.*Fix"):
        Profile.load(bad)
    bad.write_text('{"layer_times": {"a": [{"fwd": 1}]}}')
    with pytest.raises(ChipfuseError, match=r"bad.json: layer_times.a\[0\].fwd: unknown field.*Fix"):
        Profile.load(bad)
    plan = data_parallel_plan(MODEL, {"d0": 4, "elsewhere": 4}, seq_len=128, micro_batch_size=4)
    with pytest.raises(PlanError, match="'elsewhere' is not in pool.*Fix"):
        predict(plan, pool())


def test_a_group_spread_over_nodes_pays_the_link_between_them():
    nodes = [{"name": f"n{i}", "device": [{"name": f"d{i}{j}", "chip": "A100"} for j in range(2)]} for i in range(2)]
    slow = pool_from_dict({"name": "p", "node": nodes, "default_link": {"bandwidth_gbit_s": 10, "latency_ms": 0.1}})

    def fsdp(devs):
        return Plan(model=MODEL, global_batch=8, seq_len=128, replicas=(Replica(stages=(
            Stage(devices=devs, first_layer=0, num_layers=4, shard="full"),), batch_share=8, micro_batch_size=8),))

    inside, across = predict(fsdp(("d00", "d01")), slow), predict(fsdp(("d00", "d10")), slow)
    assert across.step_s > inside.step_s
