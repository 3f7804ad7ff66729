"""Checkpoints: exact resume, atomic writes, checksum fallback, keep-last-K.

A checkpoint written by three ranks and loaded by two is tested where it happens: after a real
SIGKILL (test_failure.py) and through `chipfuse train --resume --exclude` (test_train_endure.py)."""

import torch

from chipfuse.data import get_batch
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure import checkpoint
from tests.endure_util import TINY, plan_for, reference_losses


def _train(model, opt, steps):
    out = []
    for step in steps:
        x, y = get_batch(step, 8, 32)
        loss = loss_sum(model(x), y) / (8 * 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def _fresh():
    model = build_model(TINY, seed=123)  # other weights than the saved ones: load must overwrite them
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def test_resume_continues_the_same_loss_curve_exactly(tmp_path):
    ref = reference_losses(6)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, opt, range(3))
    plan = plan_for({"a": 8})
    path = checkpoint.save(tmp_path, step=3, model=model, optimizer=opt, plan=plan.to_dict())
    assert path.name == "step_000003" and not list(tmp_path.glob("*.tmp"))
    torch.manual_seed(99)
    model2, opt2 = _fresh()
    r = checkpoint.load(tmp_path, model=model2, optimizer=opt2)
    assert r.step == 3 and Plan.from_dict(r.plan) == plan and not r.passed_over
    # Same process, same kernels, same order: the resumed curve is bitwise the uninterrupted one.
    torch.testing.assert_close(_train(model2, opt2, range(3, 6)), ref[3:], rtol=0, atol=0)


def _two_checkpoints(tmp_path):
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, opt, range(2))
    checkpoint.save(tmp_path, step=2, model=model, optimizer=opt, plan={})
    _train(model, opt, range(2, 4))
    checkpoint.save(tmp_path, step=4, model=model, optimizer=opt, plan={})


def test_corrupted_checkpoint_falls_back_to_previous_and_says_so(tmp_path):
    _two_checkpoints(tmp_path)
    shard = next((tmp_path / "step_000004").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can see it
    shard.write_bytes(bytes(raw))
    said = []
    model, opt = _fresh()
    r = checkpoint.load(tmp_path, model=model, optimizer=opt, log=said.append)
    assert r.step == 2
    assert "step_000004" in said[0] and "sha256" in said[0] and "step_000002" in said[0]
    ref = reference_losses(3)
    torch.testing.assert_close(_train(model, opt, [2]), ref[2:], rtol=0, atol=0)


def test_truncated_checkpoint_and_half_written_one_are_not_taken(tmp_path):
    _two_checkpoints(tmp_path)
    meta = tmp_path / "step_000004" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    (tmp_path / "step_000006.tmp").mkdir()  # a write that crashed before its rename
    (tmp_path / "step_000006.tmp" / ".metadata").write_bytes(b"partial")
    path, manifest, passed = checkpoint.find_latest(tmp_path)
    assert path.name == "step_000002" and manifest["step"] == 2
    assert len(passed) == 1 and "truncated" in passed[0]


def test_every_checkpoint_bad_is_a_clear_error(tmp_path):
    import pytest

    _two_checkpoints(tmp_path)
    for d in tmp_path.iterdir():
        (d / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="(?s)every checkpoint failed.*Fix"):
        checkpoint.find_latest(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist.*Fix"):
        checkpoint.find_latest(tmp_path / "nothing")


def test_keeps_only_the_last_k(tmp_path):
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for s in range(1, 5):
        checkpoint.save(tmp_path, step=s, model=model, optimizer=opt, plan={}, keep=2)
    assert checkpoint.complete_steps(tmp_path) == [3, 4]
