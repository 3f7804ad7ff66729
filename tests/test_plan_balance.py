"""Unequal shares: whole samples summing to the batch, and the least finishing time (brute force)."""

import itertools
import random

import pytest

from chipfuse.plan.balance import ReplicaRate, balance_shares, largest_remainder


@pytest.mark.parametrize("seed", range(5))
def test_shares_reach_the_least_deadline_that_brute_force_finds(seed):
    rng = random.Random(seed)
    for _ in range(40):
        rates = [ReplicaRate(fill_s=rng.uniform(0, 2), steady_s=rng.uniform(0.1, 2), micro_batch_size=rng.choice([1, 2, 3]),
                             count=rng.choice([1, 1, 2])) for _ in range(rng.randint(1, 3))]
        batch = rng.randint(1, 12)
        shares = balance_shares(rates, batch)
        flat = [(r, n) for r, ns in zip(rates, shares, strict=True) for n in ns]
        assert sum(n for _, n in flat) == batch and all(isinstance(n, int) and n >= 0 for _, n in flat)
        got = max(r.time_for(n) for r, n in flat)
        reps = [r for r, _ in flat]
        best = min(max(r.time_for(n) for r, n in zip(reps, split, strict=True))
                   for split in itertools.product(range(batch + 1), repeat=len(reps)) if sum(split) == batch)
        assert got == pytest.approx(best)


def test_faster_replicas_take_more_and_caps_hold():
    fast = ReplicaRate(fill_s=0.0, steady_s=1.0, micro_batch_size=1)
    slow = ReplicaRate(fill_s=0.0, steady_s=3.0, micro_batch_size=1)
    assert balance_shares([fast, slow], 8) == [[6], [2]]
    capped = ReplicaRate(fill_s=0.0, steady_s=1.0, micro_batch_size=1, max_share=3)
    assert balance_shares([capped, slow], 8) == [[3], [5]]


def test_largest_remainder():
    assert largest_remainder([4, 2, 1], 56) == [32, 16, 8]
    out = largest_remainder([1, 1, 1], 10)
    assert sum(out) == 10 and sorted(out) == [3, 3, 4]
