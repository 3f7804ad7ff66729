"""Stage groups of several devices against one device: tensor parallel (DTensor) and FSDP2-sharded
stages inside pipelines, replicas whose groups differ in size, the built-in GPT and Hugging Face
decoders (their generic stages, tied embeddings included).

Tolerances, and why:
- gradients after one step: atol 1e-5, rtol 1e-4. Tensor parallel sums each row-parallel matmul in
  two halves then all-reduces them, and a sharded group sums its members' rows by reduce-scatter,
  so fp32 additions run in another order than on one device: a few ulps of values ~1e-2, and a
  little more on the few gradients that are sums of many cancelling terms.
- 50-step loss curves: atol 1e-4 over the first 20 steps (the first step's loss is the same forward
  up to the same reordering; differences stay at 1e-7..1e-5 while training is smooth), and 5e-3
  over all 50: AdamW's division by sqrt(v) amplifies ulp-level differences where the loss of these
  tiny models spikes (measured, lr 3e-3: Llama PP-2 x TP-2 4.2e-3 at step 48, offload in a
  pipeline 2.4e-4 at step 33, the others below 5e-5). A wrong shard, a head counted twice or a
  missing member's rows moves the loss by 1e-2 or more from the first steps, and the step-0
  gradients are checked one by one.
"""

from __future__ import annotations

import pytest
import torch

from chipfuse.model.configs import spec_from_config_dict
from chipfuse.plan.plan import Plan, Replica, Stage
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from tests.distributed import run_ranks
from tests.hf_tiny import TINY
from tests.pipeline_helpers import TINY_GPT, TINY_LLAMA, pool_of, reference, run_steps

STEPS = 50
EARLY, CURVE_ATOL = 20, 5e-3
CFG = WorkerConfig(pace=False, lr=3e-3)  # pacing only sleeps; it changes no number


def _plan(spec, replicas: list[tuple[list[tuple[tuple[str, ...], int, dict]], int, int]]) -> Plan:
    """replicas: ([(devices, num_layers, stage fields), ...], batch_share, micro_batch_size)."""
    reps = []
    for stages, share, mbs in replicas:
        first, sts = 0, []
        for devs, n, kw in stages:
            sts.append(Stage(devices=devs, first_layer=first, num_layers=n, **kw))
            first += n
        reps.append(Replica(stages=tuple(sts), batch_share=share, micro_batch_size=mbs))
    plan = Plan(model=spec, global_batch=sum(r.batch_share for r in reps), seq_len=32, replicas=tuple(reps))
    plan.check()
    return plan


def _pool(names: list[str]):
    return pool_of({n: ("cpu", 1.0) for n in names})


def _check(results: list[dict], ref: dict, tied: dict[str, str] | None = None) -> None:
    """tied: a last stage's copy of a tied matrix -> the reference's name for it."""
    tied = tied or {}
    for r in results:
        assert {tied.get(n, n) for n in r["grads"]} <= ref["grads"].keys()
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][tied.get(name, name)], atol=1e-5, rtol=1e-4, msg=name)
        got, want = torch.tensor(r["losses"]), torch.tensor(ref["losses"])
        torch.testing.assert_close(got[:EARLY], want[:EARLY], atol=1e-4, rtol=0)
        torch.testing.assert_close(got, want, atol=CURVE_ATOL, rtol=0)


@pytest.mark.slow
def test_tensor_parallel_stage_and_a_one_device_replica_match_one_device():
    # Replica 0: the whole GPT tensor-parallel over two devices; replica 1: one device. Unequal
    # replicas whose groups differ in size, reduced layer by layer.
    plan = _plan(TINY_GPT, [([(("t0", "t1"), 3, {"tp_degree": 2})], 5, 2), ([(("s0",), 3, {})], 3, 3)])
    results = run_ranks(run_steps, 3, plan, _pool(["t0", "t1", "s0"]), STEPS, CFG)
    _check(results, reference(TINY_GPT, plan, STEPS, CFG))
    d = results[0]["describe"]
    assert d["group_kind"] == "tp" and d["applied"]["tp_degree"] == 2
    # Each member holds half of every attention and MLP matrix.
    assert results[0]["local_numel"] < results[2]["local_numel"]


@pytest.mark.slow
def test_pipeline_with_a_sharded_two_device_stage_matches_one_device():
    # Stage 0 on one device feeds stage 1 sharded (FSDP2, ZeRO-3) over two devices that split each
    # micro-batch by rows; checkpointing on the sharded stage too.
    plan = _plan(TINY_GPT, [([(("a",), 1, {}), (("b0", "b1"), 2, {"shard": "full", "checkpoint": "full"})], 6, 2)])
    results = run_ranks(run_steps, 3, plan, _pool(["a", "b0", "b1"]), STEPS, CFG)
    _check(results, reference(TINY_GPT, plan, STEPS, CFG))
    assert results[1]["describe"]["applied"]["fsdp"] and results[1]["describe"]["applied"]["shard"] == "full"


@pytest.mark.slow
def test_llama_pipeline_of_two_tensor_parallel_stages_matches_one_device():
    # PP-2 x TP-2 on the Hugging Face Llama (4 ranks: two stages of two devices).
    plan = _plan(TINY_LLAMA, [([(("a0", "a1"), 2, {"tp_degree": 2}), (("b0", "b1"), 1, {"tp_degree": 2})], 4, 2)])
    results = run_ranks(run_steps, 4, plan, _pool(["a0", "a1", "b0", "b1"]), STEPS, CFG)
    _check(results, reference(TINY_LLAMA, plan, STEPS, CFG))


@pytest.mark.slow
def test_tied_hf_pipeline_with_a_tensor_parallel_last_stage_matches_one_device():
    # Qwen2 from its config (q/k/v biases, head tied to the embedding), generic HF stages: stage 0 on
    # one device, stage 1 tensor-parallel over two. The tied matrix is one unit of the first and the
    # last stage's groups of the same replica, so it is summed over all three ranks.
    spec = spec_from_config_dict({**TINY["qwen2"], "max_position_embeddings": 32}, name="tiny-qwen2", source="t")
    plan = _plan(spec, [([(("a",), 1, {}), (("b0", "b1"), 2, {"tp_degree": 2})], 4, 2)])
    results = run_ranks(run_steps, 3, plan, _pool(["a", "b0", "b1"]), STEPS, CFG)
    _check(results, reference(spec, plan, STEPS, CFG), tied={"lm_head.weight": "model.embed_tokens.weight"})
    assert results[1]["describe"]["applied"]["tp_degree"] == 2
    torch.testing.assert_close(results[0]["grads"]["model.embed_tokens.weight"], results[1]["grads"]["lm_head.weight"],
                               atol=0, rtol=0)  # one all-reduced sum on both copies


@pytest.mark.slow
def test_parameter_offload_inside_a_pipeline_matches_one_device():
    # offload = "params" on the second stage: FSDP2 over a mesh of that one device with
    # CPUOffloadPolicy (emulated accelerators run on the CPU, so nothing moves; the maths is FSDP2's).
    plan = _plan(TINY_GPT, [([(("a",), 1, {}), (("b",), 2, {"offload": "params"})], 4, 2)])
    pool = pool_of({"a": ("L4", 1.0), "b": ("L4", 1.0)})
    results = run_ranks(run_steps, 2, plan, pool, STEPS, CFG)
    _check(results, reference(TINY_GPT, plan, STEPS, CFG))
    assert results[1]["describe"]["applied"]["fsdp"] and results[1]["describe"]["applied"]["offload"] == "params"


@pytest.mark.slow
def test_a_data_parallel_group_runs_the_zero_level_its_plan_names():
    # The group's kind and ZeRO level are decided once (plan.dims) and reported as applied: an omitted
    # shard on a data-parallel group is written into the plan as "grads", "optimizer" runs as itself
    # (FSDP2 lays it out like ZeRO-2: runtime/parallel/fsdp.py), and both match one device.
    steps = 3
    for fields, level in (({}, "grads"), ({"shard": "optimizer"}, "optimizer")):
        plan = _plan(TINY_GPT, [([(("b0", "b1"), 3, fields)], 4, 2)])
        assert plan.replicas[0].stages[0].shard == level and plan.replicas[0].stages[0].dp_degree == 2
        results = run_ranks(run_steps, 2, plan, _pool(["b0", "b1"]), steps, CFG)
        _check(results, reference(TINY_GPT, plan, steps, CFG))
        for r in results:
            assert r["describe"]["group_kind"] == "fsdp"
            assert r["describe"]["applied"]["fsdp"] and r["describe"]["applied"]["shard"] == level
