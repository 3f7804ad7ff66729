"""Bad input gets a clear message naming the file, the field and the fix."""

import json
import math

import pytest
import torch

from chipfuse.cluster.pool import load_pool
from chipfuse.errors import ChipfuseError, PlanError, PoolError
from chipfuse.plan.plan import Plan
from chipfuse.runtime.endure.checkpoint import CheckpointError, check_resumable
from chipfuse.runtime.endure.guard import LossGuard, NonFiniteLossError
from tests.endure_util import TINY, plan_for


def test_malformed_pool_file(tmp_path):
    f = tmp_path / "pool.toml"
    f.write_text('[[node]]\nname = "a"\n[[node.device]]\nname = "x"\nchip = "A100"\nemulate = { speed = "fast" }\n')
    with pytest.raises(PoolError, match=r"pool.toml: node\[0\].device\[0\].emulate.speed: found 'fast', expected a number.*Fix"):
        load_pool(f)
    f.write_text("[[node]\n")
    with pytest.raises(PoolError, match="not valid TOML.*Fix"):
        load_pool(f)


def test_malformed_plan_files(tmp_path):
    f = tmp_path / "plan.json"
    f.write_text("{ not json")
    with pytest.raises(PlanError, match="plan.json: not valid JSON.*Fix"):
        Plan.from_json(f)
    good = json.loads(plan_for({"a": 4, "b": 4}).to_json())
    good["replicas"][0]["batch_share"] = 5
    f.write_text(json.dumps(good))
    with pytest.raises(PlanError, match=r"batch_share.*sum to 9, global_batch is 8.*Fix"):
        Plan.from_json(f)
    del good["replicas"]
    f.write_text(json.dumps(good))
    with pytest.raises(PlanError, match="plan.json: replicas: missing.*Fix"):
        Plan.from_json(f)


def test_plan_that_does_not_match_the_pool(tmp_path):
    f = tmp_path / "pool.toml"
    f.write_text('name = "two"\n[[node]]\nname = "n"\n[[node.device]]\nname = "a"\nchip = "cpu"\n'
                 '[[node.device]]\nname = "b"\nchip = "cpu"\n')
    plan = plan_for({"a": 4, "gone": 4})
    with pytest.raises(PlanError, match="device 'gone' is not in pool 'two'.*Fix: re-plan"):
        plan.check_against_pool(load_pool(f))


def test_resume_with_another_batch_or_model_is_refused():
    saved = json.loads(plan_for({"a": 8}).to_json())
    check_resumable(saved, plan_for({"x": 5, "y": 3}), "ckpt/step_000004")  # other devices: fine
    with pytest.raises(CheckpointError, match="global_batch=8.*has 6.*Fix"):
        check_resumable(saved, plan_for({"a": 6}), "ckpt/step_000004")
    other = {**saved, "model": {**saved["model"], "dim": 128}}
    with pytest.raises(CheckpointError, match="written with model=.*Fix"):
        check_resumable(other, plan_for({"a": 8}), "ckpt/step_000004")


def _step(model, opt, guard, step, poison):
    from chipfuse.data import get_batch
    from chipfuse.model.gpt import loss_sum

    x, y = get_batch(step, 4, 32)
    loss = loss_sum(model(x), y) / (4 * 32)
    if poison:
        loss = loss * float("nan")  # as an overflow would make it
    opt.zero_grad()
    loss.backward()
    if guard.admit(step, loss.item()):
        opt.step()


def test_nan_loss_is_skipped_and_reported():
    from chipfuse.model.gpt import build_model

    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    said = []
    guard = LossGuard(policy="skip", log=said.append, max_consecutive_skips=2)
    _step(model, opt, guard, 0, poison=False)
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, guard, 1, poison=True)
    for a, b in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # a skipped step changes nothing
    assert guard.skipped == [1] and "step 1: loss is nan; update skipped" in said[0]
    _step(model, opt, guard, 2, poison=False)
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())
    _step(model, opt, guard, 3, poison=True)
    _step(model, opt, guard, 4, poison=True)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*Fix"):
        _step(model, opt, guard, 5, poison=True)


def test_nan_loss_stops_when_told():
    guard = LossGuard(policy="stop", checkpoint_hint="ckpt/step_000010")
    assert guard.admit(7, 2.5)
    with pytest.raises(NonFiniteLossError, match="step 8: loss is inf; stopped.*ckpt/step_000010.*Fix"):
        guard.admit(8, float("inf"))
    with pytest.raises(ChipfuseError, match="nan_policy: 'maybe'.*Fix"):
        LossGuard(policy="maybe")


ONE = '[[node]]\nname = "h"\n[[node.device]]\nname = "solo"\nchip = "cpu"\n'


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_trainer_applies_the_nan_policy(tmp_path, capsys, policy):
    from chipfuse.cli import main

    pool = tmp_path / "pool.toml"
    pool.write_text(ONE)
    # lr 1e30: the first update throws the weights so far that the next loss is not finite.
    rc = main(["train", "--pool", str(pool), "--model", "tiny", "--steps", "12", "--global-batch", "4",
               "--solo-samples", "0", "--no-progress", "--lr", "1e30", "--nan-policy", policy,
               "--run-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 2  # a clear error, not a traceback
    if policy == "stop":
        assert "step 1: loss is" in captured.err and "stopped (nan_policy=stop)" in captured.err
    else:
        assert "update skipped (nan_policy=skip, 1 skipped so far)" in captured.out
        assert "for 6 steps in a row; stopped (nan_policy=skip allows 5)" in captured.err


def test_malformed_model_config(tmp_path):
    from chipfuse.model.configs import resolve_model

    f = tmp_path / "config.json"
    f.write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(ChipfuseError, match="config.json: cannot read a Hugging Face config.*Fix"):
        resolve_model(str(f))
    f.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ChipfuseError, match="config.json: field 'num_hidden_layers' missing.*Fix"):
        resolve_model(str(f))
