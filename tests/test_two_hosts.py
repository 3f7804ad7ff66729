"""A pool spanning two hosts, run with torchrun's c10d rendezvous between two network
namespaces joined by a veth pair: the traffic really crosses a network interface."""

import json

import pytest

from chipfuse.cli import main
from tests.netns import POOL, train_on_two_hosts, two_hosts  # noqa: F401  (two_hosts is a fixture)


@pytest.mark.slow
def test_two_hosts_over_veth_with_c10d_rendezvous(two_hosts, tmp_path):  # noqa: F811
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--global-batch", "8", "--dry-run",
                 "--run-dir", str(tmp_path / "plan")]) == 0
    out = tmp_path / "out.json"
    train_on_two_hosts(two_hosts, port=29611, rdzv_id="job",
                       train_args=["--pool", str(pool), "--plan", str(tmp_path / "plan" / "plan.json"), "--steps",
                                   "3", "--json", str(out), "--no-progress", "--solo-samples", "0",
                                   "--metrics", str(tmp_path / "m.jsonl")])
    s = json.loads(out.read_text())
    assert s["shares"] == {"a": 5, "b": 3} and s["final_loss"] < s["initial_loss"]
    assert set(s["devices"]) == {"a", "b"}
