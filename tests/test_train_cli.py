"""`chipfuse train` end to end: torchrun workers on an emulated pool, JSON out."""

import json

import pytest
import torch

from chipfuse.cli import main
from chipfuse.errors import DeviceMemoryError
from chipfuse.runtime.emulate.device import MemoryMeter, Pacer

POOL = """
name = "test-pool"
[[node]]
name = "host"
[[node.device]]
name = "fast"
chip = "A100"
emulate = { speed = 0.6 }
[[node.device]]
name = "slow"
chip = "T4"
emulate = { speed = 0.3, memory_gib = 0.05 }
"""


@pytest.mark.slow
def test_train_on_emulated_pool_writes_summary_and_metrics(tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    out = tmp_path / "summary.json"
    rc = main(["train", "--pool", str(pool), "--model", "tiny", "--steps", "4", "--global-batch", "12",
               "--micro-batch", "4", "--solo-samples", "4", "--run-dir", str(tmp_path / "run"),
               "--json", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads(out.read_text())
    for key in ("tokens_per_s", "initial_loss", "final_loss", "fusion_efficiency", "emulated", "shares"):
        assert key in s, key
    assert s["emulated"] is True
    assert s["shares"] == {"fast": 8, "slow": 4}  # 2 : 1 by declared speed
    assert s["final_loss"] < s["initial_loss"]
    # An emulated pool is predicted from the host's measured thread x declared speed, not from the
    # catalog chip each device is named after.
    assert s["prediction_source"] == "profile" and s["predicted_step_s"] > 0
    prof = json.loads((tmp_path / "run" / "emulation_profile.json").read_text())
    assert prof["emulated"] and prof["flops"]["fast"]["fp32"] == pytest.approx(2 * prof["flops"]["slow"]["fp32"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["emulated"] and set(rows[0]["devices"]) == {"fast", "slow"}


def test_plan_that_does_not_match_pool_is_refused_before_workers_start(tmp_path, capsys):
    from chipfuse.model.spec import SPEC_PRESETS
    from chipfuse.plan.plan import data_parallel_plan

    plan = data_parallel_plan(SPEC_PRESETS["tiny"], {"fast": 4, "ghost": 4}, seq_len=32, micro_batch_size=4)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    assert main(["train", "--pool", str(pool), "--plan", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'ghost' is not in pool 'test-pool'" in err and "Fix:" in err
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_memory_cap_is_enforced_like_an_out_of_memory_error():
    from chipfuse.data import get_batch
    from chipfuse.model.gpt import build_model, loss_sum
    from chipfuse.model.spec import SPEC_PRESETS

    model = build_model(SPEC_PRESETS["tiny"])
    x, y = get_batch(0, 16, 32)
    roomy = MemoryMeter(device_name="big", cap_bytes=None)
    with roomy.track():
        loss_sum(model(x), y).backward()
    need = roomy.peak_bytes
    assert need > 0 and roomy.live_act_bytes == 0  # activations are released after backward
    meter = MemoryMeter(device_name="small", cap_bytes=need // 2)
    with pytest.raises(DeviceMemoryError, match="'small' \\(emulated\\) is out of memory.*Fix"):
        with meter.track():
            loss_sum(model(x), y).backward()


def test_pacer_pads_to_target_and_never_speeds_up():
    import time

    p = Pacer(speed=0.5, unit_s=0.01, slack=1.0)
    t0 = time.perf_counter()
    p.pad(t0, 2)  # 2 units at half speed: 40 ms
    assert time.perf_counter() - t0 >= 0.039
    late = time.perf_counter() - 1.0
    assert p.pad(late, 1) == 0.0  # already past the target: no sleep
    assert torch.get_num_threads() >= 1


@pytest.mark.slow
def test_single_device_runs_in_process_and_measured_shares_follow_speed(tmp_path):
    one = tmp_path / "one.toml"
    one.write_text('[[node]]\nname = "h"\n[[node.device]]\nname = "solo"\nchip = "cpu"\nemulate = { speed = 1.0 }\n')
    out = tmp_path / "one.json"
    assert main(["train", "--pool", str(one), "--model", "tiny", "--steps", "2", "--global-batch", "4",
                 "--solo-samples", "0", "--run-dir", str(tmp_path / "r1"), "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["shares"] == {"solo": 4}

    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    out2 = tmp_path / "m.json"
    # Start from an even split; the warm-up measures the devices and re-splits 2 : 1.
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--steps", "2", "--global-batch", "12",
                 "--even", "--shares", "measured", "--solo-samples", "0", "--run-dir", str(tmp_path / "r2"),
                 "--json", str(out2), "--no-progress"]) == 0
    shares = json.loads(out2.read_text())["shares"]
    assert sum(shares.values()) == 12 and shares["fast"] > shares["slow"]


def test_bad_steps_and_dry_run(tmp_path, capsys):
    assert main(["train", "--steps", "0"]) == 2
    assert "--steps: 0 is out of range" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--dry-run", "--run-dir", str(tmp_path)]) == 0
    from chipfuse.plan.plan import Plan

    plan = Plan.from_json(tmp_path / "plan.json")
    assert plan.devices == ("fast", "mid", "slow") and plan.global_batch == 56
