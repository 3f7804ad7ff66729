"""A pool spanning two hosts, run with torchrun's c10d rendezvous between two network
namespaces joined by a veth pair: the traffic really crosses a network interface."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from chipfuse.cli import main

POOL = """
name = "two-hosts"
[[node]]
name = "hostA"
[[node.device]]
name = "a"
chip = "A100"
emulate = { speed = 0.6 }
[[node]]
name = "hostB"
[[node.device]]
name = "b"
chip = "T4"
emulate = { speed = 0.3 }
[[link]]
nodes = ["hostA", "hostB"]
bandwidth_gbit_s = 1
latency_ms = 0.1
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = str(os.getpid() % 100000)
    ns = [f"cfa{tag}", f"cfb{tag}"]
    veth = [f"cva{tag}", f"cvb{tag}"]
    addrs = ["10.231.7.1", "10.231.7.2"]  # only inside the two namespaces this test makes
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs, strict=True):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        pytest.skip(f"network namespaces unavailable: {e.stderr.decode().strip()}")
    yield list(zip(ns, veth, addrs, strict=True))
    for n in ns:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_two_hosts_over_veth_with_c10d_rendezvous(two_hosts, tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--global-batch", "8", "--dry-run",
                 "--run-dir", str(tmp_path / "plan")]) == 0
    out = tmp_path / "out.json"
    endpoint = f"{two_hosts[0][2]}:29611"
    procs = []
    for (ns, veth, addr), node, is_host in zip(two_hosts, ["hostA", "hostB"], ["true", "false"], strict=True):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=veth, OMP_NUM_THREADS="1")
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "job",
               # Which agent hosts the rendezvous store: inside a namespace the endpoint's address is not
               # recognised as local, so say it (on real hosts torchrun works this out itself).
               "--rdzv-conf", f"is_host={is_host}", "--local-addr", addr,
               "-m", "chipfuse.cli", "train", "--pool", str(pool), "--plan", str(tmp_path / "plan" / "plan.json"),
               "--pool-node", node, "--steps", "3", "--json", str(out), "--no-progress", "--solo-samples", "0",
               "--metrics", str(tmp_path / "m.jsonl")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    s = json.loads(out.read_text())
    assert s["shares"] == {"a": 5, "b": 3} and s["final_loss"] < s["initial_loss"]
    assert set(s["devices"]) == {"a", "b"}
