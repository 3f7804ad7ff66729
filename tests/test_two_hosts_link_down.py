"""The link between two hosts taken down mid-run (a real interface, in network namespaces): the
workers notice within a bounded time (the collective timeout), say which peer they lost and how
to resume, and the run resumes from its last checkpoint once the link is back."""

import json
import signal
import subprocess
import time

import pytest

from chipfuse.cli import main
from chipfuse.runtime.endure import checkpoint
from tests.netns import POOL, start_on_two_hosts, train_on_two_hosts, two_hosts  # noqa: F401  (a fixture)

TIMEOUT_S = 10
"""The collective timeout the workers get (CHIPFUSE_COLLECTIVE_TIMEOUT_S; 60 s by default)."""
BOUND_S = 60
"""From the cut to the line naming it: the timeout, plus a busy 2-core host's scheduling."""


@pytest.mark.slow
def test_link_down_mid_run_is_detected_named_and_resumable(two_hosts, tmp_path):  # noqa: F811
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--global-batch", "8", "--dry-run",
                 "--run-dir", str(tmp_path / "plan")]) == 0
    ck = tmp_path / "ck"
    args = ["--pool", str(pool), "--plan", str(tmp_path / "plan" / "plan.json"), "--no-progress", "--solo-samples",
            "0", "--checkpoint-dir", str(ck), "--checkpoint-every", "2", "--no-rebalance"]
    logs = [tmp_path / "hostA.log", tmp_path / "hostB.log"]
    files = [p.open("w") for p in logs]
    procs = start_on_two_hosts(two_hosts, port=29617, rdzv_id="cut", train_args=[*args, "--steps", "100000"],
                               env={"CHIPFUSE_COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S), "PYTHONFAULTHANDLER": "1"}, stdout=files)
    try:
        deadline = time.time() + 240
        while not checkpoint.complete_steps(ck):
            assert time.time() < deadline and all(p.poll() is None for p in procs), _tail(logs)
            time.sleep(0.2)
        ns, veth, _ = two_hosts[0]
        subprocess.run(["ip", "-n", ns, "link", "set", veth, "down"], check=True)
        cut = time.time()
        while not any("lost contact with another worker" in p.read_text() for p in logs):
            if time.time() - cut > BOUND_S:
                for p in procs:  # where the workers wait: faulthandler prints their stacks on SIGABRT
                    subprocess.run(["pkill", "-ABRT", "-P", str(p.pid)], check=False)
                time.sleep(3)
                raise AssertionError(f"not detected within {BOUND_S} s:\n{_tail(logs)}")
            time.sleep(0.2)
        detected_s = time.time() - cut
    finally:
        for p in procs:  # the agents may wait on their own store; the workers die with them
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        for f in files:
            f.close()
    said = next(line for p in logs for line in p.read_text().splitlines() if "lost contact" in line)
    assert ("hostA <-> hostB" in said or "hostB <-> hostA" in said) and "Fix:" in said and f"--resume {ck}" in said, said
    assert detected_s >= TIMEOUT_S * 0.5 or "reset" in said or "closed" in said, (detected_s, said)
    subprocess.run(["ip", "-n", ns, "link", "set", veth, "up"], check=True)
    last = checkpoint.complete_steps(ck)[-1]
    out = tmp_path / "out.json"
    train_on_two_hosts(two_hosts, port=29618, rdzv_id="resumed",
                       train_args=[*args, "--resume", str(ck), "--steps", str(last + 2), "--json", str(out)])
    s = json.loads(out.read_text())
    assert s["resumed_from"].endswith(f"step_{last:06d}") and s["steps"] == last + 2


def _tail(logs) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(p.read_text()[-2000:] for p in logs if p.exists())
