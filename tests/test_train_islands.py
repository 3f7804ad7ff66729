"""`chipfuse train --plan` with islands: the trainer runs DiLoCo between them over the pool's
emulated slow link."""

import json
from dataclasses import replace

import pytest

from chipfuse.cli import main
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.plan import Plan, Replica, Stage, SyncPlan, data_parallel_plan

POOL = """
name = "two-sites"
[[node]]
name = "A"
[[node.device]]
name = "a"
chip = "cpu"
count = 2
emulate = { speed = 0.4 }
[[node]]
name = "B"
[[node.device]]
name = "b"
chip = "cpu"
emulate = { speed = 0.2 }
[[link]]
nodes = ["A", "B"]
bandwidth_gbit_s = 0.1
latency_ms = 20
"""


@pytest.mark.slow
def test_train_honours_plan_islands(tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    plan = data_parallel_plan(SPEC_PRESETS["tiny"], {"a0": 4, "a1": 4, "b": 2}, seq_len=32, micro_batch_size=4)
    plan = replace(plan, sync=SyncPlan(islands=(("a0", "a1"), ("b",)), outer_every=2, compression="bf16"))
    plan.to_json(tmp_path / "plan.json")
    out = tmp_path / "summary.json"
    rc = main(["train", "--pool", str(pool), "--plan", str(tmp_path / "plan.json"), "--steps", "5",
               "--solo-samples", "0", "--run-dir", str(tmp_path / "run"), "--json", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads(out.read_text())
    sync = s["sync"]
    assert sync["mode"] == "islands" and sync["groups"] == [[0, 1], [2]] and sync["compression"] == "bf16"
    # 5 steps with H=2: outer steps after steps 2 and 4, and one for the round cut short at the end.
    assert sync["outer_steps"] == 3 and sync["link"]["calls"] == 3
    # Only the bf16 pseudo-gradient crossed the link: half the fp32 parameter bytes per call.
    assert sync["link"]["payload_bytes"] == 3 * 2 * s["num_params"]
    assert s["final_loss"] < s["initial_loss"]


def _run(tmp_path, name: str, plan) -> dict:
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    plan.to_json(tmp_path / f"{name}.json")
    out = tmp_path / f"{name}-summary.json"
    rc = main(["train", "--pool", str(pool), "--plan", str(tmp_path / f"{name}.json"), "--steps", "5",
               "--solo-samples", "0", "--no-rebalance", "--run-dir", str(tmp_path / name), "--json", str(out),
               "--no-progress"])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_an_island_may_be_a_pipeline(tmp_path):
    """Island A runs its replica as a two-stage pipeline (a0: layers 0-1, a1: layer 2), island B as
    one device: DiLoCo then syncs each unit with the ranks holding it. A pipeline computes what one
    device computes, so the run must follow the same run with island A's replica on a0 alone:
    same inner steps, same outer Nesterov steps (H=2, and the round cut short at the end)."""
    spec = SPEC_PRESETS["tiny"]
    sync = SyncPlan(islands=(("a0", "a1"), ("b",)), outer_every=2, outer_lr=0.7, outer_momentum=0.9)
    b = Replica(stages=(Stage(devices=("b",), first_layer=0, num_layers=3),), batch_share=2, micro_batch_size=2)
    piped = Plan(model=spec, global_batch=6, seq_len=32, sync=sync, replicas=(
        Replica(stages=(Stage(devices=("a0",), first_layer=0, num_layers=2),
                        Stage(devices=("a1",), first_layer=2, num_layers=1)), batch_share=4, micro_batch_size=2), b))
    whole = replace(piped, sync=replace(sync, islands=(("a0",), ("b",))), replicas=(
        Replica(stages=(Stage(devices=("a0",), first_layer=0, num_layers=3),), batch_share=4, micro_batch_size=2), b))
    p, w = _run(tmp_path, "piped", piped), _run(tmp_path, "whole", whole)
    assert p["sync"]["mode"] == "islands" and p["sync"]["outer_steps"] == 3
    # Units held by different ranks cross the link in separate calls: more calls, the same bytes.
    assert p["sync"]["link"]["payload_bytes"] == w["sync"]["link"]["payload_bytes"] == 3 * 4 * w["num_params"]
    # The same arithmetic up to the order of float32 sums (the pipeline's stage boundary, the
    # per-unit all-reduces): a few ulp per step, far below one step's loss change (~1e-2).
    assert p["losses"] == pytest.approx(w["losses"], rel=1e-5, abs=1e-5)
    assert p["final_loss"] < p["initial_loss"]
