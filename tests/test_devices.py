"""One table of device kinds (chipfuse.devices), read by every layer.

The toy kind below is registered from this file alone: its chips are this host's CPUs under
another vendor name. A pool file naming it loads, plans and trains, and its devices get the
kind's torch type, collective library and memory reading, with no other file knowing of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tomllib
import torch

from chipfuse import devices
from chipfuse.cluster.catalog import GiB, load_catalog
from chipfuse.cluster.pool import load_pool, pool_from_dict, pool_to_dict
from chipfuse.errors import PlanError, PoolError
from chipfuse.plan.memory import compute_dtype
from chipfuse.runtime.launch import dist as cfdist
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from chipfuse.runtime.parallel.topology import check_runnable
from tests.distributed import run_ranks
from tests.pipeline_helpers import TINY_GPT, plan_of, reference, run_steps

TOY_MEMORY = (3 * GiB, 4 * GiB)
TOY = devices.DeviceKind(vendor="toyco", torch_type="cpu", backend="gloo", read_memory=lambda index: TOY_MEMORY,
                         dtypes=frozenset({"fp16"}))

TOY_POOL = """
name = "toy"
[[chip]]
name = "Toy-1"
vendor = "toyco"
memory_gib = 4
tflops_bf16 = 2
tflops_fp32 = 1
mem_bw_gbs = 50
link_gbs = 10
source = "tests/test_devices.py"
[[node]]
name = "host0"
[[node.device]]
name = "t0"
chip = "Toy-1"
[[node.device]]
name = "c0"
chip = "cpu"
"""


@pytest.fixture
def toy_kind():
    devices.register_kind(TOY)
    yield TOY
    devices.unregister_kind(TOY.vendor)


def test_the_table_covers_every_vendor_the_catalog_names():
    named = {c.vendor for c in load_catalog().values()}
    assert named <= set(devices.vendors())
    for k in devices.kinds():
        assert k.torch_type and k.backend, k
    # kinds of one torch type share their library (register_kind holds it)
    by_type: dict[str, set[str]] = {}
    for k in devices.kinds():
        by_type.setdefault(k.torch_type, set()).add(k.backend)
    assert all(len(b) == 1 for b in by_type.values()), by_type


def test_the_table_and_the_planner_import_no_torch():
    # plan/ reads the table; the table's device functions import torch only when called.
    code = ("import sys, chipfuse.devices, chipfuse.plan.hardware, chipfuse.plan.search; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          timeout=120).returncode == 0


def test_cambricon_is_mlu_on_cncl_in_every_layer():
    # The old disagreement: the pool said cncl while the runtime had no mlu entry.
    pool = pool_from_dict({"node": [{"name": "n", "device": [{"name": "m", "chip": "MLU370-X8", "count": 2},
                                                             {"name": "e", "chip": "MLU370-X8",
                                                              "emulate": {"speed": 0.5}}]}]})
    m0, e = pool.device("m0"), pool.device("e")
    assert m0.backend == "cncl" and pool_to_dict(pool)["devices"][0]["backend"] == "cncl"
    assert cfdist.device_type_of(m0) == "mlu"
    assert cfdist.native_backend("mlu") == cfdist.usable_backend("cncl")
    assert cfdist.vendor_backends([m0]) == {"cambricon": "cncl"}
    if "mlu" not in cfdist.host_devices():
        assert cfdist.usable_backend("cncl") == "gloo"  # no torch_mlu here: the bridge stands in
    # An emulated MLU runs on this CPU: its type, its library and its vendor group's are the CPU's,
    # even on a host whose torch has the native library.
    assert cfdist.device_type_of(e) == "cpu" and cfdist.device_backend(e) == "gloo"
    assert cfdist.vendor_backends([m0, e]) == {"cambricon": "gloo"}
    plan = plan_of(TINY_GPT, [([("m0", 3)], 2, 1), ([("m1", 3)], 2, 1)])
    with pytest.raises(PlanError, match=r"real mlu chips but this host has 0"):
        check_runnable(plan, pool, host_devices={"cpu": 1 << 16})


def test_one_torch_type_keeps_one_library():
    with pytest.raises(ValueError, match="already uses backend 'nccl'.*Fix"):
        devices.register_kind(devices.DeviceKind(vendor="odd", torch_type="cuda", backend="hccl"))
    assert "odd" not in devices.vendors()


def test_a_toy_kind_loads_plans_and_resolves(toy_kind, tmp_path):
    from chipfuse.cli import main
    from chipfuse.model.spec import SPEC_PRESETS
    from chipfuse.plan.search import search

    f = tmp_path / "toy.toml"
    f.write_text(TOY_POOL)
    out = tmp_path / "o.json"
    assert main(["pool", "show", str(f), "--json", str(out)]) == 0
    shown = {d["name"]: d for d in json.loads(out.read_text())["devices"]}
    assert shown["t0"]["vendor"] == "toyco" and shown["t0"]["backend"] == "gloo"

    pool = load_pool(f)
    t0 = pool.device("t0")
    assert t0.kind is TOY and not t0.chip.has_bf16  # the kind's dtypes fill what the chip table omits
    assert compute_dtype("bf16", t0.chip) == "fp32"
    assert cfdist.device_type_of(t0) == "cpu" and cfdist.torch_device_kind(t0) == "cpu"
    assert cfdist.device_backend(t0) == "gloo"
    assert cfdist.vendor_backends(pool.devices) == {"toyco": "gloo", "cpu": "gloo"}
    assert t0.kind.read_memory(0) == TOY_MEMORY
    res = search(pool, SPEC_PRESETS["tiny"], global_batch=8, seq_len=32, time_budget_s=1.0)
    assert set(res.plan.devices) <= {"t0", "c0"} and res.plan.devices

    devices.unregister_kind("toyco")
    with pytest.raises(PoolError, match=r"chip\[0\]\.vendor: is 'toyco'"):
        load_pool(f)
    devices.register_kind(TOY)


def test_detection_reads_memory_through_the_kind(toy_kind, monkeypatch):
    from chipfuse.cluster import detect

    toy_acc = devices.DeviceKind(vendor="toyacc", torch_type="toyacc", backend="toyccl",
                                 read_memory=lambda index: (index, 7 * GiB))
    devices.register_kind(toy_acc)
    try:
        monkeypatch.setattr(devices, "host_devices", lambda: {"cpu": 1 << 16, "toyacc": 2})
        found = {d["device"]: d for d in detect.detect_devices()}
        assert found["toyacc:1"]["memory_bytes"] == 7 * GiB and found["toyacc:1"]["kind"] == "toyacc"
        assert found["cpu"]["memory_bytes"] == devices.host_memory()[1] > 0
        # a library torch does not know is never chosen, whatever the host has
        assert cfdist.usable_backend("toyccl") == "gloo"
    finally:
        devices.unregister_kind("toyacc")


def _toy_steps(rank: int, world: int, *args):  # type: ignore[no-untyped-def]
    devices.register_kind(TOY)  # a spawned worker starts with the built-in table only
    return run_steps(rank, world, *args)


@pytest.mark.slow
def test_a_toy_kind_trains_beside_a_cpu(toy_kind):
    # One replica on the toy chip, one on a CPU: two vendor groups joined by the bridge, as two
    # real vendors would be, and the result of one device training the whole batch.
    pool = pool_from_dict(tomllib.loads(TOY_POOL))
    plan = plan_of(TINY_GPT, [([("t0", 3)], 2, 1), ([("c0", 3)], 2, 2)])
    cfg = WorkerConfig(pace=False, lr=3e-3)
    results = run_ranks(_toy_steps, 2, plan, pool, 2, cfg)
    ref = reference(TINY_GPT, plan, 2, cfg)
    for r in results:
        # a sum of 2 fp32 terms in another order: a few ulps
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    red = [x for x in results[0]["describe"]["reducers"] if x["bridge"] is not None]
    assert red and set(red[0]["vendor_groups"]) == {"toyco", "cpu"}
    assert {g["backend"] for g in red[0]["vendor_groups"].values()} == {"gloo"}
