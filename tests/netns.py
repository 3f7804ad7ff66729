"""Two test hosts on one machine: network namespaces joined by a veth pair, and a launcher that
starts one torchrun agent in each, joined by c10d rendezvous. Addresses live only inside the two
namespaces the fixture makes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

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
NODES = ("hostA", "hostB")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """[(namespace, veth, address)] for two hosts; skipped without root and iproute2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = str(os.getpid() % 100000)
    ns = [f"cfa{tag}", f"cfb{tag}"]
    veth = [f"cva{tag}", f"cvb{tag}"]
    addrs = ["10.231.7.1", "10.231.7.2"]
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


def train_on_two_hosts(hosts: list[tuple[str, str, str]], *, port: int, rdzv_id: str, train_args: list[str]) -> None:
    """`chipfuse train TRAIN_ARGS --pool-node <node>` on both hosts, one worker each; asserts both exit 0."""
    procs = start_on_two_hosts(hosts, port=port, rdzv_id=rdzv_id, train_args=train_args)
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def start_on_two_hosts(hosts: list[tuple[str, str, str]], *, port: int, rdzv_id: str, train_args: list[str],
                       env: dict[str, str] | None = None, stdout: list | None = None) -> list[subprocess.Popen]:
    """Start `chipfuse train` on both hosts (torchrun agents joined by c10d); returns the agents.
    `stdout`: a file per host for their output (default: pipes)."""
    endpoint = f"{hosts[0][2]}:{port}"
    procs = []
    for k, ((ns, veth, addr), node, is_host) in enumerate(zip(hosts, NODES, ["true", "false"], strict=True)):
        host_env = dict(os.environ, **(env or {}), GLOO_SOCKET_IFNAME=veth, OMP_NUM_THREADS="1")
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
               # Which agent hosts the rendezvous store: inside a namespace the endpoint's address is not
               # recognised as local, so say it (on real hosts torchrun works this out itself).
               "--rdzv-conf", f"is_host={is_host}", "--local-addr", addr,
               "-m", "chipfuse.cli", "train", *train_args, "--pool-node", node]
        out = stdout[k] if stdout else subprocess.PIPE
        procs.append(subprocess.Popen(cmd, env=host_env, stdout=out, stderr=subprocess.STDOUT))
    return procs
