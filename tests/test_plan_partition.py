"""The layer-split solver against brute force on random cost tables."""

import random

import numpy as np
import pytest

from chipfuse.plan.partition import brute_force, objective, partition


def random_tables(rng: random.Random, p: int, L: int, convex: bool) -> list[np.ndarray]:
    """Stage costs as the cost model makes them: per block tau + extra, a slower option past a memory limit."""
    tables = []
    for _ in range(p):
        fast, slow = sorted(rng.uniform(0.2, 3.0) for _ in range(2))
        limit_fast, limit = rng.randint(1, L), rng.randint(1, L) if rng.random() < 0.3 else L
        extra = rng.uniform(0, 2)
        c = np.full(L + 1, np.inf)
        for k in range(1, L + 1):
            opts = [k * t + extra for t, lim in ((fast, limit_fast), (slow, limit)) if k <= lim]
            if convex:
                opts = [k * fast + extra] if k <= limit else []
            if opts:
                c[k] = min(opts)
        tables.append(c)
    return tables


@pytest.mark.parametrize("seed", range(6))
def test_exact_solver_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(60):
        p = rng.randint(1, 4)
        L = rng.randint(p, 9)
        m = rng.randint(1, 9)
        cost = random_tables(rng, p, L, convex=False)
        p2p = [rng.uniform(0, 1) for _ in range(p - 1)]
        got, want = partition(cost, L, m, p2p, scan=None, exact=True), brute_force(cost, L, m, p2p)
        assert (got is None) == (want is None)
        if want is not None:
            assert got[1] == pytest.approx(want[1], rel=1e-12)
            assert sum(got[0]) == L and min(got[0]) >= 1


@pytest.mark.parametrize("seed", range(4))
def test_fast_solver_is_exact_on_convex_costs(seed):
    rng = random.Random(100 + seed)
    for _ in range(60):
        p = rng.randint(1, 4)
        L = rng.randint(p, 10)
        m = rng.randint(1, 9)
        cost = random_tables(rng, p, L, convex=True)
        got, want = partition(cost, L, m, scan=None), brute_force(cost, L, m)
        assert (got is None) == (want is None)
        if want is not None:
            assert got[1] == pytest.approx(want[1], rel=1e-12)


def test_fast_solver_never_beats_exact_and_stays_close():
    rng = random.Random(7)
    worst = 1.0
    for _ in range(200):
        p, L, m = rng.randint(2, 4), rng.randint(4, 9), rng.randint(1, 9)
        cost = random_tables(rng, p, L, convex=False)
        fast, exact = partition(cost, L, m), partition(cost, L, m, scan=None, exact=True)
        if exact is None:
            continue
        assert fast is None or fast[1] >= exact[1] - 1e-12
        if fast is not None:
            worst = max(worst, fast[1] / exact[1])
    assert worst < 1.5  # the greedy pass only ranks; the search re-solves its winner exactly


def test_equal_stages_split_evenly_and_memory_limits_are_respected():
    L = 12
    even = [np.array([np.inf] + [k * 1.0 for k in range(1, L + 1)]) for _ in range(3)]
    k, obj = partition(even, L, m=8)
    assert k == [4, 4, 4] and obj == pytest.approx(objective(even, k, 8, [0.0, 0.0]))
    capped = [c.copy() for c in even]
    capped[0][3:] = np.inf  # stage 0 holds at most 2 blocks
    k, _ = partition(capped, L, m=8, exact=True)
    assert k[0] <= 2 and sum(k) == L
    assert partition([np.full(L + 1, np.inf)] * 3, L, m=8) is None
    assert partition(even, 2, m=8) is None  # more stages than blocks
