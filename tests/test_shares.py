"""Share computation: whole samples, summing to the batch, in proportion, within memory."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.errors import PlanError
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.data_parallel import unequal_data_parallel
from chipfuse.plan.memory import plan_memory
from chipfuse.plan.shares import even_shares, proportional_shares

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


def _dp(memory_gib: float, *, share: int, preferred: int, model=None):
    """One device's replica of the default data-parallel plan (sized by plan/memory.py)."""
    pool = pool_from_dict({"name": "p", "node": [{"name": "h", "device": [
        {"name": "slow", "chip": "T4", "emulate": {"speed": 0.5, "memory_gib": memory_gib}}]}]})
    plan = unequal_data_parallel(pool, model or SPEC_PRESETS["small"], global_batch=share, seq_len=128,
                                 preferred_micro_batch=preferred)
    return plan, pool


@settings(max_examples=40, deadline=None)
@given(share=st.integers(1, 200), pref=st.integers(1, 64))
def test_micro_batches_cover_share_within_memory(share, pref):
    plan, pool = _dp(16.0, share=share, preferred=pref)
    (rep,) = plan.replicas
    assert 1 <= rep.micro_batch_size <= max(1, min(pref, share))
    assert rep.micro_batch_size * rep.num_micro_batches >= share
    assert rep.micro_batch_size * (rep.num_micro_batches - 1) < share
    assert all(m.missing_bytes <= 0 for m in plan_memory(plan, pool))


def test_memory_caps_micro_batch_and_refuses_when_nothing_fits():
    roomy, _ = _dp(16.0, share=64, preferred=64, model=SPEC_PRESETS["medium"])
    tight, pool = _dp(0.2, share=64, preferred=64, model=SPEC_PRESETS["medium"])
    assert roomy.replicas[0].micro_batch_size == 64
    assert 1 <= tight.replicas[0].micro_batch_size < 64  # gradient accumulation covers the rest of the share
    assert all(m.missing_bytes <= 0 for m in plan_memory(tight, pool))
    with pytest.raises(PlanError, match="device 'slow'.*Fix"):
        _dp(0.001, share=8, preferred=8, model=SPEC_PRESETS["medium"])
