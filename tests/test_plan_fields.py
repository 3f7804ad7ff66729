"""Every field of a plan is applied by the runtime, or refused before start: never dropped.

Each field has one check below against what the worker built (one in-process worker, one emulated
device; stage groups of several devices are checked through the topology here and run in
tests/test_stage_groups.py). A field added to the Plan without an entry here fails
test_every_plan_field_is_covered: adding a parallelism means its function, its field and its test.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch

from chipfuse.errors import PlanError
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import Plan, Replica, Stage, SyncPlan
from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig
from chipfuse.runtime.parallel.topology import Topology, check_runnable, schedule_for
from tests.pipeline_helpers import pool_of

SPEC = ModelSpec(name="tiny4", num_layers=4, dim=64, num_heads=4, vocab_size=256, seq_len=32)
# An emulated L4 (it has bf16 units) and a CPU; both run as CPU workers here.
POOL = pool_of({"g": ("L4", 1.0), "g2": ("L4", 1.0), "c": ("cpu", 1.0)})


def _plan(stage: dict | None = None, **kw) -> Plan:
    st = Stage(devices=("g",), first_layer=0, num_layers=4, **(stage or {}))
    base = Plan(model=SPEC, global_batch=5, seq_len=16, replicas=(Replica(stages=(st,), batch_share=5,
                                                                          micro_batch_size=2),))
    plan = replace(base, **kw)
    plan.check()
    return plan


def _worker(plan: Plan) -> PipelineWorker:
    torch.set_num_threads(1)
    return PipelineWorker(plan, POOL, rank=0, config=WorkerConfig(pace=False))


def _two(stage: dict, devices: tuple[str, ...] = ("g", "g2")) -> Plan:
    st = Stage(devices=devices, first_layer=0, num_layers=4, **stage)
    return Plan(model=SPEC, global_batch=4, seq_len=16, replicas=(Replica(stages=(st,), batch_share=4, micro_batch_size=2),))


def check_model():
    w = _worker(_plan())
    assert w.describe()["num_params"] == sum(p.numel() for p in w.module.parameters()) > 0
    with pytest.raises(PlanError, match="re-plan for this model"):
        check_runnable(_plan(), POOL, model=replace(SPEC, num_layers=2))


def check_global_batch_and_seq_len():
    w = _worker(_plan())
    x, _ = w.batch(0)
    assert x.shape[1] == 16 and w.global_tokens == 5 * 16


def check_replicas_batch_share_micro_batch_size():
    w = _worker(_plan())
    x, y = w.batch(0)
    assert w.share == 5 and w.n_mb == math.ceil(5 / 2) and x.shape[0] == 6  # padded to whole micro-batches
    assert (y[5:] == -100).all()  # the padding adds nothing to loss or gradients


def check_schedule():
    assert schedule_for(_plan(schedule="gpipe"), 2, 4)[0] == "gpipe"
    assert schedule_for(_plan(schedule="1f1b"), 2, 4)[0] == "1f1b"
    assert schedule_for(_plan(schedule="1f1b"), 3, 2)[0] == "gpipe"  # noted in the summary


def check_dtype():
    w = _worker(_plan(dtype="bf16"))
    assert w.applied.autocast and w.applied.dtype == "bf16"
    assert all(p.dtype == torch.float32 for p in w.module.parameters())  # fp32 master weights
    logits = w._runner(torch.zeros(1, 16, dtype=torch.long))
    assert logits.dtype == torch.bfloat16


def check_optimizer_dtype():
    assert type(_worker(_plan(optimizer_dtype="int8")).opt).__name__ != type(_worker(_plan()).opt).__name__


def check_sync():
    from chipfuse.runtime.sync.grad_sync import build_gradient_sync

    plan = _plan(sync=SyncPlan(islands=(("g",),), outer_every=3, compression="bf16"))
    w = _worker(plan)
    s = build_gradient_sync(plan, POOL, list(w.module.parameters()), rank=0, rank_devices=["g"], share_fn=lambda: 5)
    d = s.describe()
    assert d["mode"] == "islands" and d["outer_every"] == 3 and d["compression"] == "bf16"
    pipe = Plan(model=SPEC, global_batch=4, seq_len=16, sync=SyncPlan(islands=(("g", "c"),)), replicas=(Replica(
        stages=(Stage(devices=("g",), first_layer=0, num_layers=2), Stage(devices=("c",), first_layer=2, num_layers=2)),
        batch_share=4, micro_batch_size=2),))
    check_runnable(pipe, POOL)  # an island may hold a pipeline (tests/test_train_islands.py runs one)
    with pytest.raises(PlanError, match="sync.islands.*spans islands.*Fix:"):
        check_runnable(replace(pipe, sync=SyncPlan(islands=(("g",), ("c",)))), POOL)


def check_stage_layers_and_devices():
    w = _worker(_plan())
    assert w.describe()["layers"] == [0, 1, 2, 3] and w.device.name == "g"


def check_tp_degree():
    check_runnable(_two({"tp_degree": 2}), POOL)
    with pytest.raises(PlanError, match="spans vendors.*Fix:"):
        check_runnable(_two({"tp_degree": 2}, ("g", "c")), POOL)
    role = Topology.of(_two({"tp_degree": 2}), POOL).role(0)
    assert role.kind == "tp" and role.group_size == 2
    odd = replace(_two({"tp_degree": 2}), model=replace(SPEC, num_heads=3, dim=66))
    with pytest.raises(PlanError, match="tp_degree.*num_heads.*Fix:"):
        check_runnable(odd, POOL)
    # An architecture without a tensor-parallel plan (GPT-2's Conv1D) is refused before start, and
    # the planner never proposes tensor parallel for it.
    from chipfuse.model.configs import spec_from_config_dict
    from chipfuse.plan.search import Context
    from tests.hf_tiny import TINY

    gpt2 = spec_from_config_dict({**TINY["gpt2"], "n_layer": 4}, name="tiny-gpt2", source="t")
    with pytest.raises(PlanError, match=r"tp_degree: 2.*'gpt2'.*Conv1D.*Fix: tp_degree = 1"):
        check_runnable(replace(_two({"tp_degree": 2}), model=gpt2), POOL)
    for spec, tp in ((SPEC, True), (gpt2, False)):
        ctx = Context.make(POOL, spec, global_batch=4, seq_len=16)
        assert any(t > 1 for k in range(len(ctx.kinds)) for _, t in ctx.unit_configs(k)) == tp


def check_dp_degree():
    # Omitted, the data degree is the devices left; the group then runs sharded, the kind named once.
    two = _two({})
    assert two.replicas[0].stages[0].dp_degree == 2 and two.replicas[0].stages[0].shard == "grads"
    assert Topology.of(two, POOL).role(1).kind == "fsdp"
    assert Plan.from_dict(two.to_dict()) == two  # a written plan carries every degree
    with pytest.raises(PlanError, match=r"stages\[0\]: tp_degree x dp_degree x ep_degree x cp_degree = 1 x 3 x 1 x 1 "
                                        r"= 3, but the stage has 2 devices\. Fix: make the degrees multiply to 2"):
        _two({"dp_degree": 3}).check()
    # A data-parallel group always runs sharded: "none" there is refused, not quietly run as ZeRO-2.
    with pytest.raises(PlanError, match=r"shard is 'none' on a data-parallel group.*Fix: set shard = \"grads\""):
        _two({"dp_degree": 2, "shard": "none"}).check()
    # Both degrees above one in one group (it needs a 2-D mesh) is refused before start.
    four = pool_of({f"g{i}": ("L4", 1.0) for i in range(4)})
    mixed = Plan(model=SPEC, global_batch=4, seq_len=16, replicas=(Replica(stages=(
        Stage(devices=("g0", "g1", "g2", "g3"), first_layer=0, num_layers=4, tp_degree=2, dp_degree=2,
              shard="full"),), batch_share=4, micro_batch_size=2),))
    mixed.check()
    with pytest.raises(PlanError, match="tp_degree 2 x dp_degree 2 mixes.*Fix:"):
        check_runnable(mixed, four)


def check_ep_and_cp_degree():
    # Named in the plan for when expert and context parallel land; refused above one until then.
    for name in ("ep_degree", "cp_degree"):
        plan = _two({name: 2})
        assert plan.replicas[0].stages[0].dp_degree == 1  # the devices left after the named degree
        with pytest.raises(PlanError, match=rf"stages\[0\]\.{name}: 2, but .* parallel is not run yet.*Fix: {name} = 1"):
            check_runnable(plan, POOL)


def check_checkpoint():
    assert _worker(_plan({"checkpoint": "selective"})).applied.checkpointed_layers == (0, 2)  # every other layer
    assert _worker(_plan({"checkpoint": "full"})).applied.checkpointed_layers == (0, 1, 2, 3)


def check_shard():
    assert Topology.of(_two({"shard": "full"}), POOL).role(1).kind == "fsdp"
    # One device divides nothing: accepted, nothing to shard.
    assert not _worker(_plan({"shard": "full"})).applied.fsdp
    # A tensor-parallel group's devices all compute every sample: no data degree to shard over.
    with pytest.raises(PlanError, match="tensor-parallel group with shard.*Fix:"):
        check_runnable(_two({"tp_degree": 2, "shard": "full"}), POOL)


def check_offload():
    # On an emulated accelerator (a CPU worker) optimizer offload moves nothing; the meter leaves the
    # AdamW state (8 bytes per parameter) out of the device's count, as the chip would.
    plain, off = _worker(_plan()), _worker(_plan({"offload": "optimizer"}))
    for w in (plain, off):
        w.step(0)
    n = sum(p.numel() for p in plain.module.parameters())
    assert plain.meter.static_bytes - off.meter.static_bytes == 8 * n
    on_cpu = replace(_plan(), replicas=(Replica(stages=(Stage(devices=("c",), first_layer=0, num_layers=4,
                                                                   offload="optimizer"),), batch_share=5, micro_batch_size=2),))
    with pytest.raises(PlanError, match="is a CPU.*Fix:"):
        check_runnable(on_cpu, POOL)


def check_descriptive():
    """excluded, strategy, pool, version say where the plan came from; the runtime reports them."""
    p = _plan(strategy="chipfuse", excluded=("c",), pool="test")
    check_runnable(p, POOL)


def check_freeze():
    """The worker's converters freeze the named units: no gradient, and the optimizer never holds them."""
    w = _worker(_plan(freeze=("embed", "block1-2")))
    frozen = {n for n, p in w.module.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("tok_emb", "pos_emb", "blocks.1.", "blocks.2.")) for n in frozen)
    held = {id(p) for g in w.opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in w.module.parameters() if p.requires_grad}
    with pytest.raises(PlanError, match="freeze: 'block9' names no unit.*Fix:"):
        _plan(freeze=("block9",))


CHECKS = {
    "model": check_model, "global_batch": check_global_batch_and_seq_len, "seq_len": check_global_batch_and_seq_len,
    "replicas": check_replicas_batch_share_micro_batch_size, "schedule": check_schedule, "dtype": check_dtype,
    "optimizer_dtype": check_optimizer_dtype, "sync": check_sync, "excluded": check_descriptive,
    "strategy": check_descriptive, "pool": check_descriptive, "version": check_descriptive,
    "stages": check_stage_layers_and_devices, "batch_share": check_replicas_batch_share_micro_batch_size,
    "micro_batch_size": check_replicas_batch_share_micro_batch_size, "devices": check_stage_layers_and_devices,
    "first_layer": check_stage_layers_and_devices, "num_layers": check_stage_layers_and_devices,
    "tp_degree": check_tp_degree, "dp_degree": check_dp_degree, "ep_degree": check_ep_and_cp_degree,
    "cp_degree": check_ep_and_cp_degree, "checkpoint": check_checkpoint, "shard": check_shard, "offload": check_offload,
    "islands": check_sync, "outer_every": check_sync, "outer_lr": check_sync, "outer_momentum": check_sync,
    "compression": check_sync, "freeze": check_freeze,
}


def test_every_plan_field_is_covered():
    names = {f.name for cls in (Plan, Replica, Stage, SyncPlan) for f in fields(cls)}
    assert names <= CHECKS.keys(), f"plan fields with no runtime check: {sorted(names - CHECKS.keys())}"


@pytest.mark.parametrize("check", sorted(set(CHECKS.values()), key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_the_runtime_applies_or_refuses_each_field(check):
    check()


def test_a_plan_over_chips_this_host_lacks_is_refused_before_start(tmp_path, capsys):
    from chipfuse.cli import main

    pool = tmp_path / "pool.toml"
    pool.write_text('[[node]]\nname = "h"\n[[node.device]]\nname = "h100"\nchip = "H100-SXM"\n')  # real, not emulated
    plan = Plan(model=SPEC, global_batch=4, seq_len=16, replicas=(Replica(stages=(
        Stage(devices=("h100",), first_layer=0, num_layers=4),), batch_share=4, micro_batch_size=2),))
    plan.to_json(tmp_path / "plan.json")
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    rc = main(["train", "--pool", str(pool), "--plan", str(tmp_path / "plan.json"), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "['h100']" in err and "this host has 0" in err and "Fix:" in err
    assert not (tmp_path / "r").exists()
