"""One run spec: resolved once by the launcher, loaded by every worker; re-planning after a lost
device keeps the plan's kind; the start-up probe runs at --seq-len; num_params counts a tied matrix once."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from chipfuse.cli import main
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.search import search
from chipfuse.runtime.endure.endure import EndureConfig
from chipfuse.runtime.endure.replan import is_pipeline, replan_survivors
from chipfuse.runtime.launch.runspec import RunSpec
from chipfuse.runtime.train.recipe import Recipe
from chipfuse.runtime.train.trainer import TrainConfig
from tests.pipeline_helpers import TINY_GPT, TINY_LLAMA, plan_of, pool_of

POOL = """
name = "two"
[[node]]
name = "h"
[[node.device]]
name = "a"
chip = "A100"
emulate = { speed = 0.6 }
[[node.device]]
name = "b"
chip = "T4"
emulate = { speed = 0.3 }
"""


def test_runspec_round_trips_through_its_file(tmp_path):
    plan = plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 4, 2)])
    spec = RunSpec(plan=plan, pool_source="pool.toml", exclude=("c",), run_dir=str(tmp_path),
                   summary_path=str(tmp_path / "s.json"),
                   train=TrainConfig(steps=7, lr=1e-3, recipe=Recipe(lr=1e-3, schedule="cosine", min_lr=1e-4),
                                     endure=EndureConfig(checkpoint_dir="ck", nan_policy="stop", slowdown="a@2:0.5")))
    back = RunSpec.load(spec.save())
    assert back == spec


def test_workers_load_the_spec_and_never_reenter_the_cli_or_recheck_the_plan(tmp_path, monkeypatch):
    """One device runs in process: every check and topology of the run can be counted."""
    from chipfuse.runtime.parallel import topology

    calls = {"check": 0, "of": 0}
    check, of = topology.Topology.check, topology.Topology.of.__func__

    def counted_check(self, **kw):
        calls["check"] += 1
        return check(self, **kw)

    def counted_of(cls, *a, **kw):
        calls["of"] += 1
        return of(cls, *a, **kw)

    monkeypatch.setattr(topology.Topology, "check", counted_check)
    monkeypatch.setattr(topology.Topology, "of", classmethod(counted_of))
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    run = tmp_path / "run"
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--exclude", "b", "--steps", "2",
                 "--global-batch", "4", "--solo-samples", "0", "--run-dir", str(run), "--no-progress"]) == 0
    # one check (the launcher's); one topology for that check and one for the worker
    assert calls == {"check": 1, "of": 2}
    spec = RunSpec.load(run / "runspec.json")
    assert spec.exclude == ("b",) and spec.plan.devices == ("a",) and spec.train.steps == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_worker_process_has_no_path_into_the_command_line(tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    run = tmp_path / "run"
    assert main(["train", "--pool", str(pool), "--model", "tiny", "--exclude", "b", "--global-batch", "4",
                 "--run-dir", str(run), "--dry-run"]) == 0
    plan = json.loads((run / "plan.json").read_text())
    from chipfuse.plan.plan import Plan

    spec = RunSpec(plan=Plan.from_dict(plan), pool_source=str(pool), exclude=("b",), run_dir=str(run),
                   summary_path=str(run / "s.json"), train=TrainConfig(steps=1, solo_samples=0, progress=False))
    path = spec.save()
    probe = ("import sys; from chipfuse.runtime.launch import worker; rc = worker.main([sys.argv[1]]); "
             "print(rc, sorted(m for m in sys.modules if m.startswith('chipfuse.commands')))")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []"
    assert json.loads(spec.result_path.read_text())["steps"] == 1


def test_lost_device_of_a_pipeline_is_replanned_as_a_pipeline():
    pool = pool_of({"a": ("A100", 0.6), "b": ("A100", 0.6), "c": ("T4", 0.3)})
    plan = plan_of(TINY_GPT, [([("a", 1), ("b", 1), ("c", 1)], 8, 2)])
    new = replan_survivors(plan, pool, {"c"})
    assert is_pipeline(new) and set(new.devices) <= {"a", "b"}
    assert (new.global_batch, new.seq_len, new.model) == (plan.global_batch, plan.seq_len, plan.model)
    assert "c" in new.excluded
    alone = replan_survivors(plan, pool, {"b", "c"})  # one device cannot hold a pipeline: the whole model
    assert alone.devices == ("a",) and not is_pipeline(alone)


def test_resume_without_a_device_keeps_a_pipeline_plan_a_pipeline(tmp_path, monkeypatch):
    """`chipfuse train --resume CK --exclude c` of a three-stage pipeline: the plan the launcher
    resolves for the survivors is a pipeline (it was unequal data parallel before)."""
    from chipfuse.cli import build_parser
    from chipfuse.commands import endure_flags
    from chipfuse.commands.train import _load_pool, make_plan
    from chipfuse.runtime.endure import checkpoint

    plan = plan_of(TINY_GPT, [([("a", 1), ("b", 1), ("c", 1)], 8, 2)])
    monkeypatch.setattr(checkpoint, "find_latest", lambda d: (tmp_path / "ck", {"plan": plan.to_dict()}, []))
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL + '[[node.device]]\nname = "c"\nchip = "T4"\nemulate = { speed = 0.3 }\n')
    args = build_parser().parse_args(["train", "--pool", str(pool), "--resume", str(tmp_path / "ck"),
                                      "--exclude", "c"])
    new = endure_flags.prepare(args, endure_flags.exclude(args, _load_pool(args.pool)), make_plan)
    assert is_pipeline(new) and set(new.devices) == {"a", "b"} and "c" in new.excluded
    assert (new.global_batch, new.seq_len, new.model) == (plan.global_batch, plan.seq_len, plan.model)


def test_search_restricted_to_one_stage_replicas_never_returns_a_pipeline():
    pool = pool_of({"a": ("A100", 0.6), "b": ("T4", 0.3)})
    found = search(pool, TINY_GPT, global_batch=8, seq_len=32, time_budget_s=1.0, pipeline=False).plan
    assert not is_pipeline(found)
    piped = search(pool, TINY_GPT, global_batch=8, seq_len=32, time_budget_s=1.0, pipeline=True).plan
    assert is_pipeline(piped)


def test_data_parallel_survivors_keep_data_parallel():
    pool = pool_of({"a": ("A100", 0.6), "b": ("T4", 0.3)})
    plan = plan_of(TINY_GPT, [([("a", 3)], 6, 2), ([("b", 3)], 3, 1)])
    new = replan_survivors(plan, pool, {"b"})
    assert new.is_pure_data_parallel and new.shares == {"a": 9}


@pytest.mark.slow
def test_start_up_probes_run_at_the_runs_seq_len(tmp_path, monkeypatch):
    """Models allowing 512 and 128 positions trained at --seq-len 16: no probe may build a longer
    batch (a 135M model allowing 8192 positions grew the launcher past 24 GB probing at its full context)."""
    from chipfuse.runtime.measure import probe

    seen: list[int] = []
    real = probe.get_batch

    def spy(step, batch, seq_len, *a, **kw):
        seen.append(seq_len)
        return real(step, batch, seq_len, *a, **kw)

    monkeypatch.setattr(probe, "get_batch", spy)
    model = ModelSpec(name="long", num_layers=2, dim=32, num_heads=2, vocab_size=256, seq_len=512)
    from chipfuse.runtime.measure.probe import measure_unit_s

    measure_unit_s(model, seq_len=16, micro_batch=2, repeats=1)
    assert seen == [16]
    seen.clear()
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    assert main(["train", "--pool", str(pool), "--model", "small", "--seq-len", "16", "--global-batch", "6",
                 "--steps", "1", "--solo-samples", "0", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    assert seen and set(seen) == {16}  # the emulation profile's timing; memory is predicted, not probed


def test_num_params_counts_a_tied_matrix_once_across_two_stages(tmp_path):
    from chipfuse.model.build import build_full

    spec = replace(TINY_LLAMA, tie_embeddings=True)
    plan = tmp_path / "plan.json"
    plan_of(spec, [([("a", 2), ("b", 1)], 4, 2)]).to_json(plan)
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    out = tmp_path / "s.json"
    assert main(["train", "--pool", str(pool), "--plan", str(plan), "--steps", "2", "--solo-samples", "0",
                 "--run-dir", str(tmp_path / "r"), "--json", str(out), "--no-progress"]) == 0
    whole = sum(p.numel() for p in build_full(spec).parameters())  # parameters() yields a tied one once
    assert json.loads(out.read_text())["num_params"] == whole
    assert (tmp_path / "r" / "runspec.json").exists()
