"""Every plan `chipfuse plan` emits for each example pool runs: the pool is rehearsed here
(`chipfuse pool rehearse`: 3 EMULATED devices covering its chip kinds and its links, memory
caps scaled by the tiny model's training state over the real model's, the tiny model of the same
family), planned with the CLI, checked by the runtime's checks, and trained for 3 steps on the
devices the plan names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomllib

from chipfuse.cli import main
from chipfuse.cluster.pool import load_pool
from chipfuse.model.configs import resolve_model
from chipfuse.plan.rehearse import choose_devices, rehearse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The model each example is written for (its comment, README or docs); the others a model whose
# training state presses on the pool's memory, of both families (the built-in GPT and a Llama,
# which runs as transformers' model).
MODELS = {
    "a100-v100-25g": "gpt2",
    "amp-v100-t4": "llama-13b",
    "big-1024": "llama-70b",
    "export-mix": "llama-13b",
    "lab-consumer-box": "gpt2-xl",
    "metis-a100-v100-t4": "gpt2-xl",
    "two-sites-slow-link": "small",
}


def test_every_example_pool_has_a_model_here():
    assert sorted(MODELS) == sorted(p.stem for p in EXAMPLES.glob("*.toml"))


def test_rehearsal_keeps_kinds_links_speeds_and_memory_pressure():
    pool = load_pool(EXAMPLES / "export-mix.toml")
    r = rehearse(pool, resolve_model("llama-13b"))
    kept = {k.name: k for k in r.kept}
    # The three kinds with the most compute, and one of them twice on one node (a link inside a
    # node), over three nodes (links between nodes).
    assert {k.chip for k in r.kept} == {"H800-SXM", "A800-SXM-80GB", "Ascend-910B"}
    assert r.intra_node_link and r.inter_node_link and len(r.kept) == 4
    assert r.kinds_left_out == ("RTX-4090", "cpu")
    # Speeds follow the catalog's bf16 peaks (989 : 312 TFLOP/s), the fastest at 0.6.
    assert kept["h800-0"].speed == pytest.approx(0.6)
    assert kept["a800-0"].speed / kept["h800-0"].speed == pytest.approx(312 / 989, rel=1e-3)
    # Caps: what the planner lets the job use on each chip x (tiny / real parameters), raised
    # together where 4 devices cannot hold what the pool's 38 hold.
    assert kept["h800-0"].memory_bytes == pytest.approx(
        kept["h800-0"].real_memory_bytes * r.memory_scale * r.memory_boost, rel=1e-6)
    assert r.memory_scale < 1e-4 and r.model.dim == 64 and r.model.model_type == "llama"
    # The planner sees the real pool's ratios (catalog x one factor): an emulated device's peak is
    # its declared chip's times its speed, so the rehearsal declares each chip divided by its speed.
    from chipfuse.cluster.pool import pool_from_dict

    rp = pool_from_dict(tomllib.loads(r.pool_toml), source="rehearsal")
    h800, a800 = rp.device("h800-0"), rp.device("a800-0")
    assert h800.emulated and h800.vendor == "nvidia" and rp.device("npu-0-0").vendor == "huawei"
    assert a800.peak_flops() / h800.peak_flops() == pytest.approx(312 / 989, rel=1e-3)
    assert h800.memory_bytes == pytest.approx(kept["h800-0"].memory_bytes, rel=1e-6)
    # A single-kind pool: a pair inside a node and a device on another node.
    lab = choose_devices(load_pool(EXAMPLES / "metis-a100-v100-t4.toml"), 2)
    assert [d.node for d in lab] == ["a100-0", "v100-0"]
    one_kind = choose_devices(load_pool(EXAMPLES / "a100-v100-25g.toml").subset(
        [f"a{n}-{i}" for n in (0, 1) for i in range(8)]), 3)
    assert sorted({d.node for d in one_kind}) == ["a0", "a1"] and len(one_kind) == 3


DEVICES = 3
"""Devices each rehearsal keeps here: ranks per run (the command's default is 4; 3 still keeps a
pair inside a node and a link between nodes, and keeps the file inside its time budget)."""



def test_rehearse_refuses_bad_input_in_one_line(tmp_path, capsys):
    out = tmp_path / "r.toml"
    assert main(["pool", "rehearse", str(tmp_path / "none.toml"), "--model", "gpt2", "--out", str(out)]) == 2
    assert main(["pool", "rehearse", str(EXAMPLES / "export-mix.toml"), "--model", "gpt-9", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no such pool file" in err[0] and "'gpt-9'" in err[1] and all("Fix:" in e for e in err)
    assert not out.exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(MODELS))
def test_emitted_plan_passes_checks_and_runs_three_steps(example, tmp_path, capsys):
    from chipfuse.plan.memory import check_plan_memory
    from chipfuse.plan.plan import Plan
    from chipfuse.runtime.launch.dist import host_devices
    from chipfuse.runtime.parallel.topology import check_runnable

    out = tmp_path / "rehearsal.toml"
    info = tmp_path / "rehearsal.json"
    assert main(["pool", "rehearse", str(EXAMPLES / f"{example}.toml"), "--model", MODELS[example],
                 "--max-devices", str(DEVICES), "--out", str(out), "--json", str(info)]) == 0
    r = json.loads(info.read_text())
    assert r["emulated"] and "EMULATED" in capsys.readouterr().out
    plan_json = tmp_path / "plan.json"
    assert main(["plan", "--pool", str(out), "--model", r["model_arg"], "--global-batch", str(r["global_batch"]),
                 "--seq-len", str(r["seq_len"]), "--time-budget", "0.5", "--json", str(plan_json)]) == 0
    plan, pool = Plan.from_json(plan_json), load_pool(out)
    # The runtime's own checks, as `chipfuse train --plan` runs them before any worker starts.
    check_plan_memory(plan, pool, source=str(plan_json))
    check_runnable(plan, pool, source=str(plan_json), host_devices=host_devices())
    summary = tmp_path / "run.json"
    rc = main(["train", "--pool", str(out), "--plan", str(plan_json), "--steps", "3", "--solo-samples", "0",
               "--run-dir", str(tmp_path / "run"), "--json", str(summary), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    s = json.loads(summary.read_text())
    assert s["emulated"] and s["steps"] == 3 and math.isfinite(s["final_loss"])
    assert sorted(s["devices"]) == sorted(plan.devices)  # the plan's devices, and only they, ran
