"""`chipfuse train --plan` applies the plan's memory strategy, and refuses one that cannot fit before it starts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from chipfuse.cli import main
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.plan import Plan, data_parallel_plan

ONE = '[[node]]\nname = "h"\n[[node.device]]\nname = "solo"\nchip = "cpu"\nemulate = {{ speed = 1.0{cap} }}\n'


def _plan(*, checkpoint: str = "none", optimizer_dtype: str = "fp32", dtype: str = "fp32") -> Plan:
    plan = data_parallel_plan(SPEC_PRESETS["tiny"], {"solo": 4}, seq_len=32, micro_batch_size=4)
    r = plan.replicas[0]
    stage = replace(r.stages[0], checkpoint=checkpoint)
    return replace(plan, replicas=(replace(r, stages=(stage,)),), optimizer_dtype=optimizer_dtype, dtype=dtype)


def _train(tmp_path, name: str, plan: Plan, cap: str = "") -> tuple[int, dict | None]:
    pool = tmp_path / f"{name}.toml"
    pool.write_text(ONE.format(cap=cap))
    path = tmp_path / f"{name}.plan.json"
    plan.to_json(path)
    out = tmp_path / f"{name}.json"
    rc = main(["train", "--pool", str(pool), "--plan", str(path), "--steps", "3", "--solo-samples", "0",
               "--run-dir", str(tmp_path / name), "--json", str(out), "--no-progress"])
    return rc, json.loads(out.read_text()) if rc == 0 else None


def test_trainer_applies_checkpointing_and_low_bit_state(tmp_path):
    _, plain = _train(tmp_path, "plain", _plan())
    _, ckpt = _train(tmp_path, "ckpt", _plan(checkpoint="full"))
    _, int8 = _train(tmp_path, "int8", _plan(optimizer_dtype="int8"))
    assert plain and ckpt and int8
    # Checkpointing changes no arithmetic: the same losses, bit for bit.
    assert (ckpt["initial_loss"], ckpt["final_loss"]) == (plain["initial_loss"], plain["final_loss"])
    # 8-bit moments: the first step is exact, then within 1e-3 (see test_memory_parity.py).
    assert int8["initial_loss"] == plain["initial_loss"]
    assert int8["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)


def test_train_refuses_a_plan_over_the_memory_cap_before_it_starts(tmp_path, capsys):
    rc, _ = _train(tmp_path, "over", _plan(), cap=", memory_gib = 0.0005")  # 0.5 MiB
    assert rc == 2
    err = capsys.readouterr().err
    assert "device 'solo' needs" in err and "MiB missing" in err and "Fix:" in err
    assert not (tmp_path / "over").exists()  # nothing started, nothing written


def test_sharded_groups_run_and_offload_on_a_cpu_is_refused():
    from chipfuse.errors import PlanError
    from chipfuse.plan.plan import Replica, Stage
    from chipfuse.runtime.parallel.topology import check_runnable
    from tests.pipeline_helpers import pool_of

    pool = pool_of({"a": ("cpu", 1.0), "b": ("cpu", 1.0)})
    base = data_parallel_plan(SPEC_PRESETS["tiny"], {"a": 4}, seq_len=32, micro_batch_size=4)
    group = replace(base, replicas=(Replica(stages=(Stage(devices=("a", "b"), first_layer=0, num_layers=base.model.num_layers,
                                                          shard="full"),), batch_share=4, micro_batch_size=4),))
    check_runnable(group, pool)  # a sharded group over two devices runs (tests/test_stage_groups.py)
    off = replace(group, replicas=(replace(group.replicas[0], stages=(replace(group.replicas[0].stages[0],
                                                                              offload="optimizer"),)),))
    with pytest.raises(PlanError, match="is a CPU.*Fix:"):
        check_runnable(off, pool)
