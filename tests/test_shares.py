"""Share computation: whole samples, summing to the batch, in proportion, within memory."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chipfuse.errors import PlanError
from chipfuse.plan.shares import even_shares, max_micro_batch, micro_batches, proportional_shares

speeds_st = st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0.01, 100), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(speeds=speeds_st, batch=st.integers(0, 5000))
def test_shares_are_whole_sum_to_batch_and_proportional(speeds, batch):
    shares = proportional_shares(speeds, batch)
    assert set(shares) == set(speeds)
    assert sum(shares.values()) == batch
    assert all(isinstance(v, int) and v >= 0 for v in shares.values())
    total = sum(speeds.values())
    for k, s in shares.items():
        # Largest remainder: within one sample of the exact proportional share.
        assert abs(s - batch * speeds[k] / total) < 1 + 1e-9


@settings(max_examples=300, deadline=None)
@given(speeds=speeds_st, batch=st.integers(1, 2000), data=st.data())
def test_shares_respect_caps(speeds, batch, data):
    caps = {k: data.draw(st.integers(0, batch)) for k in speeds}
    if sum(caps.values()) < batch:
        with pytest.raises(PlanError, match="at most"):
            proportional_shares(speeds, batch, max_share=caps)
        return
    shares = proportional_shares(speeds, batch, max_share=caps)
    assert sum(shares.values()) == batch
    assert all(shares[k] <= caps[k] for k in speeds)


def test_faster_device_never_gets_less():
    s = proportional_shares({"fast": 4, "mid": 2, "slow": 1}, 56)
    assert s == {"fast": 32, "mid": 16, "slow": 8}
    assert even_shares(["a", "b", "c"], 8) in ({"a": 3, "b": 3, "c": 2}, {"a": 3, "b": 2, "c": 3})


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_speed_is_refused(bad):
    with pytest.raises(PlanError, match="speed"):
        proportional_shares({"a": 1.0, "b": bad}, 4)


@settings(max_examples=200, deadline=None)
@given(share=st.integers(0, 500), max_mbs=st.integers(1, 64), pref=st.integers(1, 64))
def test_micro_batches_cover_share_within_memory(share, max_mbs, pref):
    mbs, count = micro_batches(share, max_mbs, pref)
    assert 1 <= mbs <= max(1, min(max_mbs, pref))
    assert mbs * count >= share and (count == 0 or mbs * (count - 1) < share)


def test_memory_caps_micro_batch_and_refuses_when_nothing_fits():
    assert max_micro_batch(memory_bytes=100, static_bytes=40, act_bytes_per_sample=10) == 5
    assert max_micro_batch(memory_bytes=None, static_bytes=40, act_bytes_per_sample=10) > 1000
    with pytest.raises(PlanError, match="device 'slow'.*Fix"):
        max_micro_batch(memory_bytes=100, static_bytes=85, act_bytes_per_sample=10, device="slow")
