"""The cost model's terms against closed forms (plan.kernels, collectives), the one memory model in both
its uses, the simulator against the closed form, and what `chipfuse plan` says about its own error."""

import json
from pathlib import Path

import pytest

from chipfuse.cli import main
from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import PlanError
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.cost import predict
from chipfuse.plan.hardware import PoolIndex, ring_allreduce_s
from chipfuse.plan.kernels import Calibration, ChipRates, block_kernels, gemm_s
from chipfuse.plan.memory import (
    StageShape,
    check_plan_memory,
    plan_memory,
    reserved_bytes,
    stage_memory,
    usable,
)
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.plan.search import search
from chipfuse.sim.pipeline import simulate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CAL = Calibration(gemm_eff_tc=0.8, mn_half=1024.0, layer_overhead_s=0.0)
A100 = ChipRates(peak_flops=312e12, mem_bw=2.0e12)


def test_gemm_efficiency_depends_on_size_dtype_and_tensor_cores():
    m = n = k = 8192
    big = 2 * m * n * k / gemm_s(m, n, k, A100, "bf16", CAL)
    fill = m * n / (m * n + 1024 * 312)  # closed form: large-GEMM efficiency x fill
    assert big == pytest.approx(312e12 * 0.8 * fill, rel=1e-9)
    small = 2 * 256 * 256 * 256 / gemm_s(256, 256, 256, A100, "bf16", CAL)
    assert small < 0.5 * big  # a small GEMM leaves most of the chip idle
    # A skinny GEMM is bound by memory traffic, never faster than its bytes allow.
    assert gemm_s(1, 8192, 8192, A100, "bf16", CAL) == pytest.approx(2 * (8192 + 8192 * 8192 + 8192) / 2.0e12)
    fp32 = ChipRates(peak_flops=19.5e12, mem_bw=2.0e12)
    assert 2 * m * n * k / gemm_s(m, n, k, fp32, "fp32", CAL) < 19.5e12 * CAL.gemm_eff_fp32
    no_tc = ChipRates(peak_flops=11e12, mem_bw=0.5e12, tensor_cores=False)
    assert 2 * m * n * k / gemm_s(m, n, k, no_tc, "bf16", CAL) < 11e12 * CAL.gemm_eff_no_tc
    for chip, dt in ((A100, "bf16"), (fp32, "fp32"), (no_tc, "fp16")):
        for size in (16, 512, 4096):
            assert 2 * size**3 / gemm_s(size, size, size, chip, dt, CAL) <= chip.peak_flops  # never above peak


def test_backward_forward_ratio_comes_from_the_shapes():
    spec = SPEC_PRESETS["llama-7b"]
    big = block_kernels(spec, 4096, 8192, A100, dtype="bf16", cal=CAL)
    assert 1.9 < big.bwd_s / big.fwd_s < 2.6  # two GEMMs per forward GEMM, flash attention's 2.5x
    # One token: the weight-gradient GEMMs (inner dimension 1) are memory-bound like the forward ones.
    tiny = block_kernels(spec, 4096, 1, A100, dtype="bf16", cal=CAL)
    assert tiny.bwd_s / tiny.fwd_s != pytest.approx(big.bwd_s / big.fwd_s, rel=0.02)


def test_tensor_parallel_collectives_follow_the_wiring():
    def pool(wiring):
        node = {"name": "box", "device": [{"name": "g", "chip": "RTX-3090", "count": 4}]}
        if wiring:
            node["wiring"] = wiring
        return pool_from_dict({"name": "box", "node": [node]})

    spec = SPEC_PRESETS["llama-1b"]

    def tp_plan():
        return Plan(model=spec, global_batch=4, seq_len=1024, dtype="bf16", replicas=(Replica(stages=(
            Stage(devices=("g0", "g1", "g2", "g3"), first_layer=0, num_layers=spec.num_layers, tp_degree=4),),
            batch_share=4, micro_batch_size=1),))

    p2p = predict(tp_plan(), pool({"pcie_gen": 4, "p2p": True}))
    host = predict(tp_plan(), pool({"pcie_gen": 4, "p2p": False, "switches": [["g0", "g1", "g2", "g3"]]}))
    assert host.step_s > 1.3 * p2p.step_s  # four all-reduces per block through host memory, one uplink
    ix = PoolIndex(pool({"pcie_gen": 4, "p2p": False, "switches": [["g0", "g1", "g2", "g3"]]}))
    hw = ix.hw(("g0", "g1", "g2", "g3"))
    assert hw.intra_bw == pytest.approx(24e9 * 0.5 / 4)
    # The collective itself is latency + size / bandwidth: a ring all-reduce's closed form.
    assert ring_allreduce_s(1e6, 4, 1e9, 1e-5) == pytest.approx(2 * 3 / 4 * 1e6 / 1e9 + 6 * 1e-5)


def test_one_memory_model_for_planner_and_runtime_check():
    spec = SPEC_PRESETS["gpt2"]
    pool = pool_from_dict({"name": "one", "node": [{"name": "n", "device": [{"name": "a", "chip": "L4"}]}]})
    plan = Plan(model=spec, global_batch=4, seq_len=1024, dtype="bf16", replicas=(Replica(stages=(
        Stage(devices=("a",), first_layer=0, num_layers=spec.num_layers, checkpoint="full"),),
        batch_share=4, micro_batch_size=2),))
    from chipfuse.model.costs import model_costs

    planner = stage_memory(model_costs(spec, 1024), StageShape(num_layers=12, is_first=True, is_last=True, group_size=1,
                                                               checkpoint="full", micro_batch_size=2, in_flight=1,
                                                               micro_batches=2),  # share 4 in micro-batches of 2
                           dtype="bf16", optimizer_dtype="fp32").total
    runtime = check_plan_memory(plan, pool)[0].peak_bytes  # what `chipfuse train --plan` checks before start
    assert runtime == pytest.approx(planner, abs=1)
    assert predict(plan, pool).memory_bytes["a"] == planner
    # A real chip's usable memory leaves the runtime's own; the reading it would show adds it back.
    cap = pool.device("a").memory_bytes
    assert usable(cap) < cap and reserved_bytes(usable(cap)) == pytest.approx(cap, rel=1e-6)
    assert usable(cap, emulated=True) == cap
    with pytest.raises(PlanError, match="dtype: is 'fp16'"):
        check_plan_memory(Plan(**{**plan.__dict__, "dtype": "fp16"}), pool)
    assert plan_memory(plan, pool)[0].peak_bytes == runtime


@pytest.mark.parametrize("pool_file,model,batch", [("amp-v100-t4.toml", "gpt2", 64),
                                                   ("export-mix.toml", "llama-1b", 64)])
def test_simulator_and_closed_form_agree_within_5_percent(pool_file, model, batch):
    from chipfuse.cluster.pool import load_pool

    pool = load_pool(EXAMPLES / pool_file)
    res = search(pool, SPEC_PRESETS[model], global_batch=batch, seq_len=1024, time_budget_s=1.0)
    sim = simulate(res.plan, pool)
    assert sim.step_s == pytest.approx(res.prediction.step_s, rel=0.05)


def test_plan_prints_error_band_dtype_and_offers(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--pool", str(EXAMPLES / "amp-v100-t4.toml"), "--model", "gpt2", "--global-batch", "32",
               "--seq-len", "1024", "--time-budget", "1", "--json", str(out)])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "expected error +/-" in text and "held-out MAPE on published runs" in text
    assert "has no bf16: it computes this bf16 plan in fp32" in text
    assert "offered: 8-bit optimizer state" in text and "searched" in text and "since the process started" in text
    d = json.loads(out.read_text())
    assert 0 < d["expected_error"]["time_mape_heldout"] < 1 and d["expected_error"]["applies"]
    assert not d["plan"]["sync"]["islands"] and d["command_s"] >= d["search_s"]
    assert {o["name"] for o in d["offers"]} >= {"8-bit optimizer state", "fp16 on chips without bf16"}


def test_segments_leaving_a_node_share_its_nic():
    from chipfuse.model.costs import model_costs
    from chipfuse.plan.cost import plan_tables
    from chipfuse.plan.gradsync import sync_segments

    spec = SPEC_PRESETS["gpt2"]

    def pool(nic):
        nodes = [{"name": n, "device": [{"name": f"{n}_", "chip": "A100", "count": 2}]} for n in ("a", "b")]
        if nic:
            for node in nodes:
                node["wiring"] = {"nic_gbit_s": nic}
        return pool_from_dict({"name": "two", "node": nodes,
                               "default_link": {"bandwidth_gbit_s": 100, "latency_ms": 0.0}})

    def stages(x, y):
        return (Stage(devices=(x,), first_layer=0, num_layers=6), Stage(devices=(y,), first_layer=6, num_layers=6))

    plan = Plan(model=spec, global_batch=8, seq_len=1024, dtype="bf16", replicas=(
        Replica(stages=stages("a_0", "a_1"), batch_share=4, micro_batch_size=2),
        Replica(stages=stages("b_0", "b_1"), batch_share=4, micro_batch_size=2)))
    costs = model_costs(spec, 1024)
    for nic, bw in ((None, 100e9 / 8), (10, 10e9 / 8 / 2)):  # two segments leave each node at once
        p = pool(nic)
        ix = PoolIndex(p, None, "bf16")
        segs = sync_segments(plan, plan_tables(plan, p, index=ix, costs=costs), ix, costs)
        assert len(segs) == 2
        params = 6 * costs.block_params + costs.embed_params
        assert segs[0].sync_s == pytest.approx(ring_allreduce_s(params * 2, 2, bw, 0.0), rel=1e-6)


def test_measured_gemm_curve_and_link_curve_are_used():
    from chipfuse.plan.hardware import link_between
    from chipfuse.plan.profile import Profile

    prof = Profile.from_dict({
        "layer_times": {"a": [{"micro_batch_size": 1, "seq_len": 128, "fwd_s": 1.0, "bwd_s": 2.0}]},
        "gemm": {"a": [[128, 1e9], [512, 2e9]]},  # four times the tokens run at twice the rate
        "links": [{"a": "n", "b": "m", "bandwidth": 1e9, "latency_s": 1e-4, "curve": [[4096, 1e7], [1 << 20, 1e9]]}]})
    assert prof.layer_time("a", 512) == pytest.approx((2.0, 4.0))  # 4x the work at 2x the rate
    assert prof.layer_time("a", 128) == pytest.approx((1.0, 2.0))
    pool = pool_from_dict({"name": "p", "node": [{"name": "n", "device": [{"name": "a", "chip": "cpu"}]},
                                                 {"name": "m", "device": [{"name": "b", "chip": "cpu"}]}]})
    assert link_between(pool, "n", "m", prof, 4096)[0] == pytest.approx(1e7)  # small messages: measured slow
    assert link_between(pool, "n", "m", prof)[0] == pytest.approx(1e9)


def test_measured_runtime_memory_replaces_the_default():
    from chipfuse.plan.profile import Profile

    spec = SPEC_PRESETS["gpt2"]
    pool = pool_from_dict({"name": "one", "node": [{"name": "n", "device": [{"name": "a", "chip": "L4"}]}]})
    plan = Plan(model=spec, global_batch=4, seq_len=1024, dtype="bf16", replicas=(Replica(stages=(
        Stage(devices=("a",), first_layer=0, num_layers=spec.num_layers, checkpoint="full"),),
        batch_share=4, micro_batch_size=2),))
    assert predict(plan, pool).fits
    hungry = Profile.from_dict({"runtime_bytes": {"a": 23 * 2**30}})  # a runtime that leaves 1 GiB
    assert not predict(plan, pool, hungry).fits
