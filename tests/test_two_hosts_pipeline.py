"""A pipeline whose two stages sit on two hosts (network namespaces joined by a veth pair),
started by torchrun's c10d rendezvous: activations and gradients cross a real interface, and
ranks are handed out by arrival, not in the plan's order."""

import json

import pytest

from tests.netns import POOL, train_on_two_hosts, two_hosts  # noqa: F401  (two_hosts is a fixture)
from tests.pipeline_helpers import TINY_GPT, plan_of


@pytest.mark.slow
def test_pipeline_across_two_hosts(two_hosts, tmp_path):  # noqa: F811
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    plan = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 4, 2)]).to_json(plan)
    out = tmp_path / "out.json"
    train_on_two_hosts(two_hosts, port=29613, rdzv_id="pp",
                       train_args=["--pool", str(pool), "--plan", str(plan), "--steps", "3", "--json", str(out),
                                   "--no-progress", "--metrics", str(tmp_path / "m.jsonl")])
    s = json.loads(out.read_text())
    assert s["devices"]["a"]["layers"] == [0, 1] and s["devices"]["b"]["layers"] == [2]
    assert s["final_loss"] < s["initial_loss"]
