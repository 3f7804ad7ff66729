"""The rebalancer: whole-sample shares, a switch when a device slows, and no flapping on noise."""

import itertools
import random

from chipfuse.runtime.endure.balance import (
    BalanceConfig,
    Rebalancer,
    best_shares,
    predicted_step_s,
    with_shares,
)
from tests.endure_util import plan_for


def test_best_shares_are_whole_sum_to_the_batch_and_keep_everyone_measured():
    assert sorted(best_shares([0.01, 0.01, 0.02], 24)) == [5, 9, 10]
    for _ in range(200):
        sps = [random.uniform(0.001, 1) for _ in range(random.randint(1, 5))]
        total = random.randint(len(sps), 64)
        s = best_shares(sps, total)
        assert sum(s) == total and min(s) >= 1


def test_best_shares_match_brute_force():
    rng = random.Random(0)
    for _ in range(100):
        sps = [rng.uniform(0.01, 0.1) for _ in range(3)]
        total = rng.randint(3, 16)
        best = min(predicted_step_s(c, sps) for c in itertools.product(range(1, total), repeat=3) if sum(c) == total)
        assert abs(predicted_step_s(best_shares(sps, total), sps) - best) < 1e-12


_RNG = random.Random(1)


def _times(shares, s_per_sample, noise=0.0, rng=_RNG):
    return [n * s * (1 + rng.uniform(-noise, noise)) for n, s in zip(shares, s_per_sample, strict=True)]


def test_no_switch_on_noise_alone():
    rb = Rebalancer([8, 8, 8], BalanceConfig())
    for step in range(50):
        assert rb.observe(step, _times(rb.shares, [0.01, 0.01, 0.01], noise=0.05)) is None


def test_slowed_device_gets_a_smaller_share_once():
    rb = Rebalancer([8, 8, 8], BalanceConfig(), names=["a", "b", "c"])
    speed = [0.01, 0.01, 0.01]
    events = []
    for step in range(40):
        if step == 10:
            speed = [0.01, 0.01, 0.02]  # device c drops to half speed
        ev = rb.observe(step, _times(rb.shares, speed, noise=0.03))
        if ev:
            events.append(ev)
    assert len(events) == 1, events  # hysteresis: one switch, then it holds
    ev = events[0]
    assert 10 < ev.step <= 16
    assert ev.new_shares[2] < ev.new_shares[0] and sum(ev.new_shares) == 24
    assert ev.predicted_new_s < 0.8 * ev.predicted_old_s
    assert "c takes" in ev.reason and ev.to_dict()["event"] == "rebalance"


def test_with_shares_keeps_a_valid_plan():
    plan = plan_for({"a": 8, "b": 8, "c": 8})
    new = with_shares(plan, [10, 9, 5])
    new.check()
    assert [r.batch_share for r in new.replicas] == [10, 9, 5] and new.global_batch == 24
    assert new.replicas[2].micro_batch_size == 5
