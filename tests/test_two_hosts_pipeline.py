"""A pipeline whose two stages sit on two hosts (network namespaces joined by a veth pair),
started by torchrun's c10d rendezvous: activations and gradients cross a real interface, and
ranks are handed out by arrival, not in the plan's order."""

import json
import os
import subprocess
import sys

from tests import test_two_hosts as hosts
from tests.pipeline_helpers import TINY_GPT, plan_of

two_hosts = hosts.two_hosts  # the namespaces fixture (only it: importing the test would run it twice)


def test_pipeline_across_two_hosts(two_hosts, tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(hosts.POOL)
    plan = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 4, 2)]).to_json(plan)
    out = tmp_path / "out.json"
    endpoint = f"{two_hosts[0][2]}:29613"
    procs = []
    for (ns, veth, addr), node, is_host in zip(two_hosts, ["hostA", "hostB"], ["true", "false"], strict=True):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=veth, OMP_NUM_THREADS="1")
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "pp",
               "--rdzv-conf", f"is_host={is_host}", "--local-addr", addr,
               "-m", "chipfuse.cli", "train", "--pool", str(pool), "--plan", str(plan), "--pool-node", node,
               "--steps", "3", "--json", str(out), "--no-progress", "--metrics", str(tmp_path / "m.jsonl")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    s = json.loads(out.read_text())
    assert s["devices"]["a"]["layers"] == [0, 1] and s["devices"]["b"]["layers"] == [2]
    assert s["final_loss"] < s["initial_loss"]
