"""`chipfuse train` end to end: a device slowed mid-run gets a smaller share without a restart (logged);
a clean stop on SIGTERM writes a checkpoint; `--resume` continues the same loss curve on another
pool (three devices -> two), re-planned; bad flags are refused."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from chipfuse.cli import main
from chipfuse.errors import ChipfuseError
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.endure.endure import Slowdown
from tests.endure_util import ENV, continue_from, reference_losses

POOL = """
name = "three"
[[node]]
name = "host"
[[node.device]]
name = "a"
chip = "A100"
emulate = { speed = 0.5 }
[[node.device]]
name = "b"
chip = "A100"
emulate = { speed = 0.5 }
[[node.device]]
name = "c"
chip = "T4"
emulate = { speed = 0.25 }
"""

ARGS = ["--model", "tiny", "--global-batch", "12", "--micro-batch", "4", "--solo-samples", "0", "--no-progress"]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_straggler_rebalanced_then_sigterm_then_resume_on_two_devices_continues_the_curve(tmp_path):
    pool, ckpt, run = tmp_path / "pool.toml", tmp_path / "ckpt", tmp_path / "run"
    pool.write_text(POOL)
    job = subprocess.Popen([sys.executable, "-m", "chipfuse.cli", "train", "--pool", str(pool), "--steps", "200",
                            "--checkpoint-dir", str(ckpt), "--run-dir", str(run), "--slowdown", "c@2:0.25", *ARGS],
                           env={**__import__("os").environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    # Calibration noise on a loaded 2-core machine may rebalance a or b first; wait for c's turn.
    while not any("c takes" in r.get("rebalance", {}).get("reason", "") for r in _rows(run / "metrics.jsonl")):
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out
    first = _rows(run / "metrics.jsonl")
    done = max(r["step"] for r in first) + 1
    ev = next(r["rebalance"] for r in first if "c takes" in r.get("rebalance", {}).get("reason", ""))
    assert ev["new_shares"][2] < ev["old_shares"][2]  # c was slowed 4x: it gives samples away
    assert "shares {'a'" in out and "c takes" in out
    assert done < 200 and checkpoint.complete_steps(ckpt) == [done]
    assert "stop requested (SIGTERM" in out and f"--resume {ckpt}" in out

    # Device c is gone: resume over a and b, re-planned (the checkpoint's plan named c).
    steps = done + 3
    rc = main(["train", "--pool", str(pool), "--exclude", "c", "--resume", str(ckpt), "--steps", str(steps),
               "--run-dir", str(run), "--json", str(tmp_path / "s.json"), *ARGS])
    assert rc == 0
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))  # nothing trained twice, nothing skipped
    assert rows[done]["resumed_from"].endswith(f"step_{done:06d}") and set(rows[done]["devices"]) == {"a", "b"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed_from"] and set(summary["shares"]) == {"a", "b"}
    # From the checkpoint, the two-device job computes what one device would: the same samples summed
    # in another split, float32 rounding only (a few steps, so Adam has no time to amplify it).
    ref = continue_from(ckpt / f"step_{done:06d}", steps, 12, spec=SPEC_PRESETS["tiny"], betas=(0.9, 0.95))
    torch.testing.assert_close([r["loss"] for r in rows[done:]], [ref[s] for s in range(done, steps)],
                               rtol=1e-5, atol=1e-6)
    # The whole curve against one device from step 0: Adam's first steps are nearly sign(grad), so a
    # gradient entry near zero can flip with the split's rounding and move by 2 x lr; hence 1e-3.
    whole = reference_losses(steps, 12, spec=SPEC_PRESETS["tiny"], betas=(0.9, 0.95))
    torch.testing.assert_close([r["loss"] for r in rows], whole, rtol=1e-3, atol=1e-4)


def test_endure_flags_are_checked_before_anything_starts(tmp_path, capsys):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    base = ["train", "--pool", str(pool), "--run-dir", str(tmp_path / "r"), *ARGS]
    assert main([*base, "--exclude", "zzz"]) == 2
    assert "--exclude 'zzz': not a device of pool 'three'" in capsys.readouterr().err
    assert main([*base, "--resume", str(tmp_path / "none")]) == 2
    assert "does not exist. Fix" in capsys.readouterr().err
    assert main([*base, "--checkpoint-every", "5"]) == 2
    assert "needs a --checkpoint-dir" in capsys.readouterr().err
    (tmp_path / "ck" / "step_000004").mkdir(parents=True)
    assert main([*base, "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    with pytest.raises(ChipfuseError, match="not DEVICE@STEP:FACTOR.*Fix"):
        Slowdown.parse("c@x:0.5")
    assert Slowdown.parse("c@20:0.5") == Slowdown(device="c", step=20, factor=0.5)


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_as_data_parallel_on_one_device(tmp_path):
    """A full plan (a two-stage pipeline over two devices) writes each stage's part; a one-device
    data-parallel plan loads the whole model and optimizer from those parts and continues."""
    from tests.pipeline_helpers import TINY_GPT, plan_of

    pool, ckpt, run = tmp_path / "pool.toml", tmp_path / "ckpt", tmp_path / "run"
    pool.write_text(POOL)
    plan = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 4, 2)]).to_json(plan)
    common = ["--pool", str(pool), "--run-dir", str(run), "--solo-samples", "0", "--no-progress", "--lr", "3e-3"]
    assert main(["train", "--plan", str(plan), "--steps", "3", "--checkpoint-dir", str(ckpt),
                 "--checkpoint-every", "2", *common]) == 0
    assert checkpoint.complete_steps(ckpt) == [2, 3]
    assert main(["train", "--resume", str(ckpt / "step_000002"), "--exclude", "b,c", "--steps", "5",
                 "--checkpoint-dir", str(tmp_path / "ckpt2"), *common]) == 0
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 2, 3, 4]  # step 2 redone from checkpoint 2, by design
    ref = continue_from(ckpt / "step_000002", 5, 4, spec=TINY_GPT, betas=(0.9, 0.95))
    # One device now, the same samples: float32 rounding of another split only.
    torch.testing.assert_close([r["loss"] for r in rows[3:]], [ref[s] for s in (2, 3, 4)], rtol=1e-5, atol=1e-6)


def test_ctrl_c_and_sigterm_become_a_stop_request():
    import os

    from chipfuse.runtime.endure.guard import CleanStop

    with CleanStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's SIGTERM after Ctrl-C: still a clean stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: the user means it
    assert stop.signal_name == "SIGINT" and signal.getsignal(signal.SIGTERM) != stop._handle  # restored
