"""Split L identical blocks over an ordered pipeline of unequal stages: a pure solver over cost arrays.

cost[i][k] is stage i's forward + backward seconds per micro-batch with k blocks (inf where k blocks
do not fit its memory). The objective is the pipeline closed form of chipfuse.plan.cost without its
neighbour-pair term (which couples adjacent stages; predict() adds it when it ranks the plans):
    sum_i cost[i][k_i] + 2 sum c + (m - 1) x max(max_i cost[i][k_i], max c)
For a bound T on the slowest stage, the least sum under T is found either greedily (each stage
starts with one block; every further block goes where it adds least, never past T: fast, and exact
when each stage's cost is convex in k) or exactly by a min-plus dynamic programme over stages x blocks
(`exact=True`; a switch to a slower memory option makes the cost non-convex). T ranges over the
breakpoints cost[i][k] from the smallest feasible one upwards, stopping once (m - 1) x T alone
exceeds the best objective found (or after `scan` breakpoints). The search ranks its candidates with
the greedy solver and re-solves the ones it keeps exactly.
"""

from __future__ import annotations

import math

import numpy as np


def _greedy(cost: list[np.ndarray], L: int, bound: float, _mats: dict | None = None) -> list[int] | None:
    """Each stage one block, then the L - p cheapest further blocks by marginal cost, none past the bound.

    Vectorised: a stage's admissible blocks are a prefix (cost grows with blocks), so the cheapest
    marginals are picked from all stages at once with one partial sort.
    """
    p = len(cost)
    if p > L:
        return None
    if _mats is None or "C" not in _mats:
        C = np.vstack(cost)[:, 1:]  # (p, L): cost of 1..L blocks
        with np.errstate(invalid="ignore"):  # inf - inf past a stage's memory limit: masked out below
            D = np.diff(C, axis=1)
        mats = {"C": C, "D": D, "cols": np.arange(max(L - 1, 0))}
        if _mats is not None:
            _mats.update(mats)
    else:
        mats = _mats
    caps = (mats["C"] <= bound).sum(axis=1)
    if caps.min() < 1 or caps.sum() < L:
        return None
    rest = L - p
    if rest == 0:
        return [1] * p
    mask = mats["cols"][None, :] < (caps - 1)[:, None]
    allm = mats["D"][mask]
    owner = np.nonzero(mask)[0]
    pick = np.argpartition(allm, rest - 1)[:rest]
    return (1 + np.bincount(owner[pick], minlength=p)).tolist()


def _exact(cost: list[np.ndarray], L: int, bound: float) -> list[int] | None:
    """Least sum of stage costs with every stage <= bound: min-plus DP over (stage, blocks used)."""
    p = len(cost)
    if p > L:
        return None
    ks = np.arange(L + 1)
    idx = ks[:, None] - ks[None, :]  # idx[j, k] = j - k: blocks used before this stage
    valid = idx >= 0
    idx = np.where(valid, idx, 0)
    dp = np.full(L + 1, np.inf)
    dp[0] = 0.0
    choices = []
    for i in range(p):
        c = np.where(cost[i] <= bound, cost[i], np.inf)
        c[0] = np.inf
        tot = np.where(valid, dp[idx] + c[None, :], np.inf)
        arg = np.argmin(tot, axis=1)
        dp = tot[ks, arg]
        choices.append(arg)
    if not np.isfinite(dp[L]):
        return None
    k, j = [0] * p, L
    for i in range(p - 1, -1, -1):
        k[i] = int(choices[i][j])
        j -= k[i]
    return k


def objective(cost: list[np.ndarray], k: list[int], m: int, p2p: list[float]) -> float:
    per = [float(cost[i][k[i]]) for i in range(len(k))]
    return sum(per) + 2 * sum(p2p) + (m - 1) * max(max(per), max(p2p, default=0.0))


def partition(cost: list[np.ndarray], L: int, m: int, p2p: list[float] | None = None,
              scan: int | None = 12, exact: bool = False) -> tuple[list[int], float] | None:
    """The best split (blocks per stage) and its objective, or None when no split fits."""
    mats: dict = {}

    def solve(c: list[np.ndarray], n: int, bound: float) -> list[int] | None:
        return _exact(c, n, bound) if exact else _greedy(c, n, bound, mats)
    p2p = p2p or [0.0] * (len(cost) - 1)
    if len(cost) > L:
        return None
    points = np.unique(np.concatenate([c[1:][np.isfinite(c[1:])] for c in cost]))
    if points.size == 0:
        return None
    lo, hi = 0, points.size - 1
    if solve(cost, L, float(points[hi])) is None:
        return None
    while lo < hi:  # the smallest feasible bound
        mid = (lo + hi) // 2
        if solve(cost, L, float(points[mid])) is not None:
            hi = mid
        else:
            lo = mid + 1
    best: tuple[list[int], float] | None = None
    stop = points.size if scan is None else min(points.size, lo + scan)
    for j in range(lo, stop):
        k = solve(cost, L, float(points[j]))
        if k is None:
            continue
        obj = objective(cost, k, m, p2p)
        if best is None or obj < best[1] - 1e-15:
            best = (k, obj)
        if m > 1 and best is not None and (m - 1) * points[j] > best[1]:
            break  # a larger bound alone already costs more than the best found
    return best


def brute_force(cost: list[np.ndarray], L: int, m: int, p2p: list[float] | None = None) -> tuple[list[int], float] | None:
    """Every composition of L into len(cost) positive parts (for tests on small cases)."""
    p = len(cost)
    p2p = p2p or [0.0] * (p - 1)
    best: tuple[list[int], float] | None = None

    def rec(i: int, left: int, acc: list[int]) -> None:
        nonlocal best
        if i == p - 1:
            k = acc + [left]
            if all(math.isfinite(cost[j][k[j]]) for j in range(p)):
                obj = objective(cost, k, m, p2p)
                if best is None or obj < best[1] - 1e-15:
                    best = (k, obj)
            return
        for n in range(1, left - (p - 1 - i) + 1):
            rec(i + 1, left - n, acc + [n])

    if p <= L:
        rec(0, L, [])
    return best
