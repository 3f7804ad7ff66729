"""Vendor groups plus a bridge give the flat all-reduce result, alone and inside training."""

from __future__ import annotations

import pytest
import torch

from chipfuse.runtime.launch.dist import usable_backend
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from chipfuse.runtime.sync.groups import link_backend, make_reducer
from tests.distributed import run_ranks
from tests.pipeline_helpers import TINY_GPT, plan_of, pool_of, reference, run_steps

VENDOR_POOL = {"n0": ("A100-SXM-80GB", 1.0), "h0": ("Ascend-910B", 1.0), "n1": ("A100-SXM-80GB", 1.0)}


def _reduce_three_ways(rank: int, world: int) -> dict:
    vendor_of = {0: "nvidia", 1: "huawei", 2: "nvidia"}
    native_of = {"nvidia": "nccl", "huawei": "hccl"}
    sets = [(0, 1, 2), (0, 2), (1, 2)]
    reducers = [make_reducer(s, vendor_of, native_of) for s in sets]  # all ranks, same order
    out = {}
    for s, red in zip(sets, reducers, strict=True):
        if rank not in s:
            continue
        t = torch.arange(5, dtype=torch.float64) * (rank + 1) + rank / 3
        flat = t.clone()
        red.all_reduce(t)
        out[s] = {"hier": t, "mine": flat, "describe": red.describe()}
    return out


@pytest.mark.slow
def test_vendor_groups_and_bridge_equal_the_flat_sum():
    res = run_ranks(_reduce_three_ways, 3)
    for s in [(0, 1, 2), (0, 2), (1, 2)]:
        # float64 and exact small values: the hierarchical order of the sum changes nothing.
        flat = sum(res[r][s]["mine"] for r in s)
        for r in s:
            torch.testing.assert_close(res[r][s]["hier"], flat, atol=0, rtol=0)
    d = res[0][(0, 1, 2)]["describe"]
    assert set(d["vendor_groups"]) == {"nvidia", "huawei"}
    assert d["vendor_groups"]["nvidia"]["ranks"] == [0, 2] and sorted(d["bridge"]["ranks"]) == [0, 1]
    assert d["bridge"]["backend"] == "gloo"
    assert res[0][(0, 2)]["describe"]["bridge"] is None  # one vendor: one native group, no bridge


def test_backend_choice():
    assert usable_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        assert usable_backend("nccl") == "gloo"  # no native library here: gloo stands in
    assert usable_backend("hccl") in ("hccl", "gloo")
    assert link_backend({"nvidia", "huawei"}, {"nvidia": "nccl", "huawei": "hccl"}) == "gloo"


@pytest.mark.slow
def test_pipeline_across_vendors_matches_one_device():
    # Replica 0 is a pipeline from an NVIDIA chip to an Ascend (its activations cross the bridge);
    # replica 1 is a whole model on another NVIDIA chip. Layers 1-2 and the head are reduced
    # between the Ascend and an NVIDIA chip: vendor groups plus bridge.
    pool = pool_of(VENDOR_POOL)
    plan = plan_of(TINY_GPT, [([("n0", 1), ("h0", 2)], 3, 2), ([("n1", 3)], 3, 3)])
    cfg = WorkerConfig(pace=False, lr=3e-3)
    results = run_ranks(run_steps, 3, plan, pool, 5, cfg)
    ref = reference(TINY_GPT, plan, 5, cfg)
    for r in results:
        for name, g in r["grads"].items():
            # a sum of ~6 fp32 terms in another order: a few ulps of 1e-2-sized gradients
            torch.testing.assert_close(g, ref["grads"][name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    red = results[1]["describe"]["reducers"]
    assert any(x["bridge"] is not None for x in red)
