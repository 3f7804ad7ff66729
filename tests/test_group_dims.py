"""A stage group's named degrees (plan.dims.GroupDims): the one place that says what a group is.

Pure: the kind, the ZeRO level that runs and whether FSDP2 wraps the stage, from the degrees alone;
every failing degree named in one message; a hand-written JSON stage that omits dp_degree and shard
gets the devices left and the level that runs, and the written plan carries them.
"""

from __future__ import annotations

import pytest

from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.dims import GroupDims
from chipfuse.plan.memory import Strategy, stage_device_memory
from chipfuse.plan.plan import Plan

SPEC = ModelSpec(name="tiny4", num_layers=4, dim=64, num_heads=4, vocab_size=256, seq_len=32)


@pytest.mark.parametrize(("dims", "kind", "zero", "fsdp"), [
    (GroupDims(), "single", "none", False),
    (GroupDims(shard="full"), "single", "none", False),  # one data rank: a shard level divides nothing
    (GroupDims(tp=4), "tp", "none", False),
    (GroupDims(dp=2, shard="optimizer"), "fsdp", "optimizer", True),
    (GroupDims(dp=4, shard="full"), "fsdp", "full", True),
])
def test_kind_and_zero_level_come_from_the_degrees(dims: GroupDims, kind: str, zero: str, fsdp: bool) -> None:
    assert (dims.kind, dims.zero, dims.wraps_fsdp("none")) == (kind, zero, fsdp)


def test_parameter_offload_wraps_fsdp_except_under_tensor_parallel() -> None:
    assert GroupDims().wraps_fsdp("params")
    assert not GroupDims(tp=2).wraps_fsdp("params")  # counted only (emulated); real chips are refused


def test_problems_name_every_failing_degree() -> None:
    assert GroupDims(tp=2, dp=2, shard="full").problems(4) == []
    bad = GroupDims(tp=0, cp=0)
    assert [p for p, _ in bad.problems(1)] == ["tp_degree is 0", "cp_degree is 0"]
    (problem, fix), = GroupDims(tp=2, dp=2, shard="full").problems(2)
    assert "2 x 2 x 1 x 1 = 4, but the stage has 2 devices" in problem and "multiply to 2" in fix


def _raw(stage: dict) -> dict:
    return {"model": SPEC.to_dict(), "global_batch": 4, "seq_len": 16, "replicas": [
        {"batch_share": 4, "micro_batch_size": 2,
         "stages": [{"devices": ["a", "b"], "first_layer": 0, "num_layers": 4, **stage}]}]}


def test_a_json_stage_that_omits_dp_degree_and_shard_gets_what_runs() -> None:
    plan = Plan.from_dict(_raw({}))
    st = plan.replicas[0].stages[0]
    assert (st.tp_degree, st.dp_degree, st.ep_degree, st.cp_degree, st.shard) == (1, 2, 1, 1, "grads")
    written = plan.to_dict()["replicas"][0]["stages"][0]
    assert written["dp_degree"] == 2 and written["shard"] == "grads"
    tp = Plan.from_dict(_raw({"tp_degree": 2})).replicas[0].stages[0]
    assert (tp.dp_degree, tp.shard, tp.dims.kind) == (1, "none", "tp")


def test_a_json_stage_with_wrong_degrees_is_one_line_with_the_fix() -> None:
    with pytest.raises(PlanError) as e:
        Plan.from_dict(_raw({"dp_degree": 2, "shard": "none"}), source="plan.json")
    msg = str(e.value)
    assert msg.startswith("plan.json: replicas[0].stages[0]: shard is 'none' on a data-parallel group")
    assert "Fix: set shard = \"grads\"" in msg and "\n" not in msg


def test_the_memory_model_prices_the_zero_level_that_runs() -> None:
    # A shard level over one device runs unsharded (plan.dims), so it is priced as plain.
    kw = dict(device="d", capacity_bytes=0, num_layers=4, first=True, last=True, group_size=1, tokens_in_flight=64)
    plain = stage_device_memory(SPEC, Strategy(), **kw)
    assert stage_device_memory(SPEC, Strategy(shard="full"), **kw).peak_bytes == plain.peak_bytes
    halves = stage_device_memory(SPEC, Strategy(shard="full"), **{**kw, "group_size": 2})
    assert halves.params_bytes == plain.params_bytes / 2
