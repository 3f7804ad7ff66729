"""A device dies for real (SIGKILL mid-run): the supervisor notices at once, then restarts on the
survivors from the last checkpoint with a new plan, or stops and says what died and how to resume."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from chipfuse.runtime.launch.supervisor import supervise, survivor_plan
from tests.endure_util import ENV, continue_from, plan_for, read_losses, worker_argv


def _kill_when(procs, rank, out, step, killed):
    """SIGKILL worker `rank` once rank 0 has logged `step` (mid-run, between checkpoints)."""
    def run():
        f = Path(f"{out}.0")
        while procs[rank].poll() is None:
            if f.exists() and any(int(ln.split()[0]) >= step for ln in f.read_text().splitlines()):
                os.kill(procs[rank].pid, signal.SIGKILL)
                killed.append(time.time())
                return
            time.sleep(0.02)
    threading.Thread(target=run, daemon=True).start()


def _run(tmp_path, policy):
    plan = plan_for({"a": 3, "b": 3, "c": 2})
    out, killed, launches = tmp_path / "loss", [], []

    def on_launch(procs, p):
        launches.append(p)
        if len(launches) == 1:
            _kill_when(procs, 2, out, 4, killed)

    outcome = supervise(plan, worker_argv(tmp_path / "ckpt", 9, 3, out, sleep_s=0.2),
                        checkpoint_dir=tmp_path / "ckpt", policy=policy, env=ENV, on_launch=on_launch,
                        log=lambda m: None)
    return outcome, killed, out


@pytest.mark.slow
def test_killed_device_is_named_and_training_continues_on_survivors(tmp_path):
    outcome, killed, out = _run(tmp_path, "restart")
    assert outcome.returncode == 0 and len(outcome.deaths) == 1
    death = outcome.deaths[0]
    assert death.device == "c" and death.how == "killed by SIGKILL"
    # A hang check, not a speed target: gloo's default timeout is 30 minutes.
    assert death.detected_unix_s - killed[0] < 10
    new = outcome.plans[1]
    assert new.devices == ("a", "b") and new.global_batch == 8 and "c" in new.excluded
    assert "Restarting on 2 survivors" in outcome.messages[0] and "step_000003" in outcome.messages[0]
    losses = read_losses(out)
    assert sorted(losses) == list(range(9))
    # The survivors redo the steps after checkpoint 3 with another split: float32 rounding only,
    # compared with one device continuing from the same checkpoint.
    ref = continue_from(tmp_path / "ckpt" / "step_000003", 9)
    torch.testing.assert_close([losses[s] for s in range(3, 9)], [ref[s] for s in range(3, 9)], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stop_policy_says_what_died_and_how_to_resume(tmp_path):
    outcome, _, _ = _run(tmp_path, "stop")
    assert outcome.returncode == 1 and len(outcome.plans) == 1
    msg = outcome.messages[0]
    assert "device 'c' (rank 2" in msg and "SIGKILL" in msg and "step_000003" in msg
    assert "--resume" in msg and "--exclude c" in msg


def test_survivor_plan_keeps_the_batch_and_the_ratio():
    plan = plan_for({"a": 6, "b": 3, "c": 3})
    new = survivor_plan(plan, {"b"})
    assert new.shares == {"a": 8, "c": 4} and new.excluded == ("b",)
