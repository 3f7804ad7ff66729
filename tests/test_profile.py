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


def test_stage_targets_follow_the_profile(tmp_path):
    from chipfuse.plan.plan import Stage
    from chipfuse.runtime.measure.profiler import stage_targets

    prof = {"layer_times": {"d": [{"micro_batch_size": 2, "seq_len": 32, "fwd_s": 0.01, "bwd_s": 0.02}]},
            "head_times": {"d": [{"micro_batch_size": 2, "seq_len": 32, "fwd_s": 0.001, "bwd_s": 0.002}]}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    mid = Stage(devices=("d",), first_layer=0, num_layers=3)
    f, b = stage_targets(str(path), "d", mid, last=False, micro_batch_size=4, seq_len=32)
    assert (round(f, 6), round(b, 6)) == (0.06, 0.12)  # 3 blocks, twice the tokens
    ck = Stage(devices=("d",), first_layer=0, num_layers=3, checkpoint="full")
    f, b = stage_targets(str(path), "d", ck, last=True, micro_batch_size=2, seq_len=32)
    assert (round(f, 6), round(b, 6)) == (0.031, 0.092)  # head added; backward recomputes the blocks' forward
    assert stage_targets(str(path), "other", mid, last=False, micro_batch_size=2, seq_len=32) is None
    # A device of a tensor-parallel pair computes half of each matmul; a member of a sharded pair
    # computes half the micro-batch's rows (2 of 4: the profile's 2-row entry, as is).
    tp = Stage(devices=("d", "e"), first_layer=0, num_layers=3, tp_degree=2)
    f, b = stage_targets(str(path), "d", tp, last=False, micro_batch_size=2, seq_len=32)
    assert (round(f, 6), round(b, 6)) == (0.015, 0.03)
    fsdp = Stage(devices=("d", "e"), first_layer=0, num_layers=3, shard="full")
    f, b = stage_targets(str(path), "d", fsdp, last=False, micro_batch_size=4, seq_len=32)
    assert (round(f, 6), round(b, 6)) == (0.03, 0.06)
