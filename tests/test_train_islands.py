"""`chipfuse train --plan` with islands: the trainer runs DiLoCo between them over the pool's
emulated slow link."""

import json
from dataclasses import replace

from chipfuse.cli import main
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.plan import SyncPlan, data_parallel_plan

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
