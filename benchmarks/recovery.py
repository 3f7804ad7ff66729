"""A device dies mid-run (a real SIGKILL of its worker); chipfuse restarts on the survivors.

Runs `chipfuse train` twice on three emulated devices: once undisturbed (the reference), once
with checkpoints every `--every` steps and the worker of device `c` killed with SIGKILL after step
`--kill-after` (found by the CHIPFUSE_DEVICE_NAME its supervisor gave it). The supervisor notices,
re-plans over `a` and `b`, and resumes from the last checkpoint. Prints and writes:

- `steps_lost`: steps completed before the kill that had to be trained again (at most `--every`);
- `recovery_s`: from the kill to the next completed step (detection, re-plan, start-up, load);
  `detect_s`: from the kill to the supervisor naming the dead device;
- `loss_gap`: |loss - reference loss| at the last step (and the largest gap over the redone and
  later steps), expected at float32 rounding: the same samples, summed in another split;
- `emulated: true`.

    .venv/bin/python benchmarks/recovery.py [--steps 24] [--every 5] [--kill-after 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chipfuse.report.output import console, table, write_json

POOL = """
name = "three-emulated"
[[node]]
name = "host0"
[[node.device]]
name = "a"
chip = "V100"
emulate = { speed = 0.5 }
[[node.device]]
name = "b"
chip = "V100"
emulate = { speed = 0.5 }
[[node.device]]
name = "c"
chip = "T4"
emulate = { speed = 0.25 }
"""


def train_argv(tmp: Path, name: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "chipfuse.cli", "train", "--pool", str(tmp / "pool.toml"), "--model", "small",
            "--steps", str(args.steps), "--global-batch", "20", "--micro-batch", "4", "--solo-samples", "0",
            "--run-dir", str(tmp / name), "--no-progress", "--checkpoint-dir", str(tmp / name / "ckpt"),
            "--checkpoint-every", str(args.every)]


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_of(parent: int, device: str) -> int | None:
    """The pid of the worker for `device` among `parent`'s children (by the env the supervisor set)."""
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"CHIPFUSE_DEVICE_NAME={device}".encode() in env:
            return int(pid)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--kill-after", type=int, default=12)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "pool.toml").write_text(POOL)
        if subprocess.call(train_argv(tmp, "reference", args), env=env, stdout=subprocess.DEVNULL):
            raise SystemExit("reference run failed")
        ref = {r["step"]: r["loss"] for r in rows(tmp / "reference" / "metrics.jsonl")}

        job = subprocess.Popen(train_argv(tmp, "killed", args), env=env, stdout=subprocess.DEVNULL)
        metrics = tmp / "killed" / "metrics.jsonl"
        while not any(r["step"] >= args.kill_after for r in rows(metrics)):
            if job.poll() is not None:
                raise SystemExit("the run ended before the kill")
            time.sleep(0.02)
        victim = worker_of(job.pid, "c")
        assert victim is not None, "worker of device c not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        done_before = max(r["step"] for r in rows(metrics)) + 1
        rc = job.wait()
        if rc:
            raise SystemExit(f"the killed run did not recover (exit {rc})")
        after = rows(metrics)
        summary = json.loads((tmp / "killed" / "summary.json").read_text())

    resumed = next(r for r in after if "resumed_from" in r)
    resumed_step = resumed["step"]
    first_after = min((r for r in after if r["time_unix_s"] > killed_at), key=lambda r: r["time_unix_s"])
    final = {r["step"]: r["loss"] for r in after}  # a redone step keeps its last value
    gaps = {s: abs(final[s] - ref[s]) for s in final if s >= resumed_step}
    res = {
        "emulated": True,
        "pool": "a, b at speed 0.5 and c at 0.25 (emulated on CPU workers); c's worker is SIGKILLed",
        "steps": args.steps,
        "checkpoint_every": args.every,
        "killed_after_step": done_before - 1,
        "resumed_from_step": resumed_step,
        "steps_lost": done_before - resumed_step,
        "recovery_s": first_after["time_unix_s"] - killed_at,
        "detect_s": summary["device_losses"][0]["detected_unix_s"] - killed_at,
        "loss_gap": gaps[args.steps - 1],
        "loss_gap_max_after_recovery": max(gaps.values()),
        "final_loss": final[args.steps - 1],
        "reference_final_loss": ref[args.steps - 1],
        "device_losses": summary.get("device_losses"),
        "shares_after_restart": summary.get("restart_plans"),
    }
    console.print(table("recovery benchmark (EMULATED devices)", ["figure", "value"],
                        [[k, res[k]] for k in ("killed_after_step", "resumed_from_step", "steps_lost", "detect_s", "recovery_s",
                                               "loss_gap", "loss_gap_max_after_recovery")]))
    console.print(f"device c killed after step {res['killed_after_step']}; resumed at step {resumed_step} on a, b "
                  f"{res['shares_after_restart']}: steps_lost {res['steps_lost']} (interval {args.every}), "
                  f"recovery_s {res['recovery_s']:.1f}, loss_gap {res['loss_gap']:.2e} | EMULATED devices")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
