"""`chipfuse profile` writes a profile in the planner's format, for every device it can stand for."""

import json

from chipfuse.cli import main

POOL = """
name = "prof"
[[node]]
name = "h"
[[node.device]]
name = "fast"
chip = "A100-SXM-80GB"
emulate = { speed = 0.8 }
[[node.device]]
name = "slow"
chip = "Ascend-910B"
emulate = { speed = 0.4 }
[[node.device]]
name = "real-gpu"
chip = "H100-SXM"
"""


def test_profile_command_writes_planner_profile(tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    out = tmp_path / "profile.json"
    assert main(["profile", "--pool", str(pool), "--model", "tiny", "--micro-batch", "1,2", "--no-links",
                 "--json", str(out)]) == 0
    p = json.loads(out.read_text())
    assert p["emulated"] is True
    assert set(p["layer_times"]) == {"fast", "slow"} and p["unmeasured"] == ["real-gpu"]
    for ts in p["layer_times"].values():
        assert [t["micro_batch_size"] for t in ts] == [1, 2]
        assert all(t["fwd_s"] > 0 and t["bwd_s"] > 0 and t["seq_len"] == 32 for t in ts)
    assert all(v["fp32"] > 0 and v["bf16"] > 0 for v in p["flops"].values())
    assert p["host"]["mem_bw_bytes_s"] > 0 and p["links"] == []
