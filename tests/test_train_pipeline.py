"""`chipfuse train --plan` with pipeline stages: summary with predicted and measured step time,
the timeline picture, and refusal of a plan the runtime cannot run before anything starts."""

import json

import pytest

from chipfuse.cli import main
from chipfuse.plan.plan import Plan, Replica, Stage
from tests.pipeline_helpers import TINY_GPT, plan_of

POOL = """
name = "two-vendors"
[[node]]
name = "h"
[[node.device]]
name = "gpu"
chip = "A100-SXM-80GB"
emulate = { speed = 0.8 }
[[node.device]]
name = "npu"
chip = "Ascend-910B"
emulate = { speed = 0.4 }
"""


@pytest.mark.slow
def test_train_pipeline_plan_reports_predicted_and_measured(tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    plan = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("gpu", 2), ("npu", 1)], 4, 2)]).to_json(plan)
    out, png = tmp_path / "s.json", tmp_path / "tl.png"
    rc = main(["train", "--pool", str(pool), "--plan", str(plan), "--steps", "4", "--run-dir", str(tmp_path / "r"),
               "--json", str(out), "--timeline", str(png), "--no-progress"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["emulated"] is True and s["predicted_step_s"] > 0 and s["measured_step_s"] > 0
    assert abs(s["prediction_error"] - (s["predicted_step_s"] / s["measured_step_s"] - 1)) < 1e-9
    assert s["devices"]["gpu"]["layers"] == [0, 1] and s["devices"]["npu"]["layers"] == [2]
    assert s["final_loss"] < s["initial_loss"]
    assert png.stat().st_size > 10_000


def test_plan_with_a_stage_group_is_refused_before_workers_start(tmp_path, capsys):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    bad = Plan(model=TINY_GPT, global_batch=4, seq_len=32, replicas=(Replica(
        stages=(Stage(devices=("gpu", "npu"), first_layer=0, num_layers=3),), batch_share=4, micro_batch_size=2),))
    path = tmp_path / "plan.json"
    bad.to_json(path)
    assert main(["train", "--pool", str(pool), "--plan", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "stages[0].devices" in err and "Fix:" in err
    assert not (tmp_path / "r").exists()
