"""No state lost, nothing from elsewhere runs code: DiLoCo's outer state survives a resume exactly;
a worker SIGKILLed while writing a checkpoint leaves the previous one usable; a supervisor killed
leaves no worker; a checkpoint carrying a malicious pickle is refused."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from chipfuse.cli import main
from chipfuse.model.gpt import build_model
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.plan import SyncPlan, data_parallel_plan
from chipfuse.runtime.endure import checkpoint
from tests.endure_util import ENV, TINY
from tests.test_train_islands import POOL as ISLAND_POOL


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_island_run_resumed_mid_round_equals_the_uninterrupted_one(tmp_path):
    """H = 2 and a checkpoint after step 3: mid-round, after one outer step (so the outer momentum
    is not zero). Resumed from it, the run must compute the same losses as the run that went on."""
    (tmp_path / "pool.toml").write_text(ISLAND_POOL)
    plan = data_parallel_plan(SPEC_PRESETS["tiny"], {"a0": 4, "a1": 4, "b": 2}, seq_len=32, micro_batch_size=4)
    plan = replace(plan, sync=SyncPlan(islands=(("a0", "a1"), ("b",)), outer_every=2, outer_momentum=0.9))
    plan.to_json(tmp_path / "plan.json")
    common = ["train", "--pool", str(tmp_path / "pool.toml"), "--plan", str(tmp_path / "plan.json"), "--steps", "6",
              "--solo-samples", "0", "--no-progress", "--no-rebalance", "--unit-s", "0.001"]
    assert main([*common, "--run-dir", str(tmp_path / "full"), "--checkpoint-dir", str(tmp_path / "ck_full"),
                 "--checkpoint-every", "3"]) == 0
    (tmp_path / "ck_resumed").mkdir()
    shutil.copytree(tmp_path / "ck_full" / "step_000003", tmp_path / "ck_resumed" / "step_000003")
    assert main([*common, "--run-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "ck_resumed")]) == 0
    full, resumed = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        # The same processes' arithmetic on the same state: equal to float rounding of the logged
        # mean (an outer momentum restarted from zero moves step 4's loss by ~1e-3).
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, full, resumed)


SAVER = textwrap.dedent("""
    import sys, torch
    from chipfuse.model.gpt import build_model
    from chipfuse.model.spec import ModelSpec
    from chipfuse.runtime.endure import checkpoint
    spec = ModelSpec(name="tiny", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters())
    root, step = sys.argv[1], int(sys.argv[2])
    checkpoint.save(root, step=step, model=model, optimizer=opt, plan={})
""")


@pytest.mark.slow
def test_worker_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    root = tmp_path / "ck"
    env = {**os.environ, **ENV}
    subprocess.run([sys.executable, "-c", SAVER, str(root), "2"], env=env, check=True, timeout=120)
    # The second save stops after writing its tensors, before its manifest: killed there, for real.
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root), "4"],
                            env={**env, "CHIPFUSE_TEST_SAVE_PAUSE": "after_tensors:60"})
    try:
        deadline = time.time() + 120
        while not (root / ".paused_after_tensors").exists():
            assert time.time() < deadline and proc.poll() is None, "the save never reached its pause"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / "step_000004.tmp").is_dir() and not (root / "step_000004").exists()
    path, manifest, passed = checkpoint.find_latest(root)
    assert path.name == "step_000002" and manifest["step"] == 2 and not passed
    model = build_model(TINY, seed=5)
    r = checkpoint.load(root, model=model, optimizer=torch.optim.AdamW(model.parameters()), log=lambda m: None)
    assert r.step == 2
    torch.testing.assert_close(model.state_dict(), build_model(TINY).state_dict(), rtol=0, atol=0)


SUPERVISOR = textwrap.dedent("""
    import sys, time
    from chipfuse.model.spec import ModelSpec
    from chipfuse.plan.plan import data_parallel_plan
    from chipfuse.runtime.launch.supervisor import supervise
    spec = ModelSpec(name="tiny", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
    plan = data_parallel_plan(spec, {"a": 2, "b": 2}, seq_len=32, micro_batch_size=2)
    pids = sys.argv[2]
    def on_launch(procs, plan):
        open(pids, "w").write(" ".join(str(p.pid) for p in procs))
    worker = [sys.executable, "-c", "import time; time.sleep(120)"]
    supervise(plan, lambda path, resume: worker, checkpoint_dir=sys.argv[1], on_launch=on_launch)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by init) holds nothing: count it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_supervisor_killed_leaves_no_worker(tmp_path, sig):
    pids_file = tmp_path / "pids"
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path / "ck"), str(pids_file)],
                           env={**os.environ, **ENV})
    deadline = time.time() + 60
    while not (pids_file.exists() and pids_file.read_text()):
        assert time.time() < deadline and sup.poll() is None
        time.sleep(0.05)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    sup.send_signal(sig)
    sup.wait(timeout=30)
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived the supervisor ({signal.Signals(sig).name})"


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, monkeypatch):
    """An old-format rng.pt carrying a pickle that would run a command: never unpickled fully."""
    monkeypatch.chdir(tmp_path)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters())
    ck = checkpoint.save(tmp_path / "ck", step=1, model=model, optimizer=opt, plan={})
    (ck / checkpoint.RNG_FILE).unlink()
    (ck / "rng.pt").write_bytes(pickle.dumps(_Boom()))
    manifest = json.loads((ck / checkpoint.MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k != checkpoint.RNG_FILE}
    manifest["files"]["rng.pt"] = {"sha256": checkpoint._sha256(ck / "rng.pt"), "bytes": (ck / "rng.pt").stat().st_size}
    (ck / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="rng.pt: not restored"):
        checkpoint.load(ck, model=model, optimizer=opt, log=lambda m: None)
    assert not (tmp_path / "PWNED").exists()


def test_manifest_pointing_outside_its_directory_is_refused(tmp_path):
    model = build_model(TINY)
    ck = checkpoint.save(tmp_path / "ck", step=1, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                         plan={})
    manifest = json.loads((ck / checkpoint.MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (ck / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"files\.\.\./\.\./etc/passwd: not a plain file name.*Fix"):
        checkpoint.verify(ck)


def test_checkpoint_index_with_a_malicious_pickle_is_refused(tmp_path, monkeypatch):
    """DCP's .metadata is a pickle: one that would run a command is refused before DCP reads it,
    even when the manifest was rewritten to match it (an attacker can do that)."""
    monkeypatch.chdir(tmp_path)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters())
    ck = checkpoint.save(tmp_path / "ck", step=1, model=model, optimizer=opt, plan={})
    (ck / ".metadata").write_bytes(pickle.dumps(_Boom()))
    manifest = json.loads((ck / checkpoint.MANIFEST).read_text())
    manifest["files"][".metadata"] = {"sha256": checkpoint._sha256(ck / ".metadata"),
                                      "bytes": (ck / ".metadata").stat().st_size}
    (ck / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata: refused .*posix.system|\.metadata: refused"):
        checkpoint.load(ck, model=model, optimizer=opt, log=lambda m: None)
    assert not (tmp_path / "PWNED").exists()


def test_no_loader_unpickles_arbitrary_objects():
    """A guard over the source: every torch.load is weights_only=True, no pickle.load of a file,
    and pretrained weights come from safetensors only. Allowed: the restricted unpickler of DCP's
    index (checkpoint.py) and memory_probe.py, which unpickles what its own child process sent."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "chipfuse"
    found = []
    for f in sorted(src.rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                found.append(f"{f.name}: torch.load without weights_only=True")
        if f.name not in ("checkpoint.py", "memory_probe.py") and re.search(r"pickle\.(load|loads|Unpickler)\b", text):
            found.append(f"{f.name}: pickle load")
        # Weights only: a model class's from_pretrained (configs and tokenizers are JSON, never pickles).
        for m in re.finditer(r"(?<![`\w])(?:AutoModel\w*|\w+ForCausalLM)\.from_pretrained\(", text):
            if "use_safetensors=True" not in _call_args(text, m.end()):
                found.append(f"{f.name}: from_pretrained without use_safetensors=True")
    assert not found, found


def _call_args(text: str, start: int) -> str:
    """The arguments of the call whose opening parenthesis ends at `start` (nested parentheses kept)."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i]
