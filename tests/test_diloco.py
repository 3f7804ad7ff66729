"""Islands: DiLoCo with H=1 is synchronous training; the outer Nesterov step is the hand formula."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from chipfuse.cluster.pool import pool_from_dict
from chipfuse.data import get_batch
from chipfuse.errors import PlanError
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import SyncPlan, data_parallel_plan
from chipfuse.runtime.sync.diloco import DiLoCo, make_island_groups, sync_gradients
from chipfuse.runtime.sync.grad_sync import build_gradient_sync
from tests.distributed import run_ranks

SPEC = ModelSpec(name="t", num_layers=2, dim=64, num_heads=4, vocab_size=256, seq_len=32)
ISLANDS = ((0, 1), (2,))
# Samples of ranks 0, 1, 2 at each step: islands of 5+1, then 2+4 (a rebalance), then 3+3. The
# global batch stays 6, as the trainer's rebalancer keeps it.
SHARES = ((3, 2, 1), (1, 1, 4), (2, 1, 3))
SEQ, STEPS, LR = 32, 3, 0.1
GLOBAL = sum(SHARES[0])


def _reference() -> list[torch.Tensor]:
    """One process, the whole batch, plain SGD on the mean token loss."""
    model = build_model(SPEC, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = get_batch(step, GLOBAL, SEQ)
        (loss_sum(model(x), y) / (GLOBAL * SEQ)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _train(rank: int, mode: str) -> list[torch.Tensor]:
    groups = make_island_groups(ISLANDS, rank=rank, world_size=3)
    model = build_model(SPEC, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # Outer lr 1 and no momentum: the outer step then sets the global parameters to the
    # token-weighted mean of the islands' parameters, which after one SGD step is the sync step.
    step = 0
    diloco = DiLoCo(model.parameters(), groups=groups, global_samples=GLOBAL,
                    share_fn=lambda: SHARES[step][rank], inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    for step in range(STEPS):
        start = sum(SHARES[step][:rank])
        x, y = get_batch(step, GLOBAL, SEQ, start=start, count=SHARES[step][rank])
        # chipfuse's convention in every mode: summed token loss over the GLOBAL token count.
        (loss_sum(model(x), y) / (GLOBAL * SEQ)).backward()
        if mode == "diloco":
            diloco.sync_inner_grads()
        else:
            sync_gradients(list(model.parameters()), groups)
        opt.step()
        opt.zero_grad()
        if mode == "diloco":
            assert diloco.after_inner_step()
    return [p.detach().clone() for p in model.parameters()]


def _outer_by_hand(rank: int, compression: str) -> list[list[float]]:
    """Two outer rounds on a 2-element parameter with chosen island parameters."""
    groups = make_island_groups(ISLANDS, rank=rank, world_size=3)
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    # Islands of 2+1 and 1 samples per step: weights 0.75 and 0.25.
    diloco = DiLoCo([p], groups=groups, global_samples=4, share_fn=lambda: (2, 1, 1)[rank], inner_steps=2,
                    outer_lr=0.7, outer_momentum=0.9, compression=compression)
    out = []
    for rnd in range(2):
        with torch.no_grad():  # stand-in for the inner steps: move the island to a chosen point
            p.add_(torch.tensor(((-0.5, 0.5), (1.0, -1.0))[groups.index]) * (rnd + 1))
        for last in (False, True):
            diloco.sync_inner_grads()  # zero gradients here; it counts the island's samples
            assert diloco.after_inner_step() == last
        out.append(p.detach().tolist())
    return out


TWO_SITES = {
    "node": [{"name": "A", "device": [{"name": "a", "chip": "cpu", "count": 2, "emulate": {"speed": 0.5}}]},
             {"name": "B", "device": [{"name": "b", "chip": "cpu", "emulate": {"speed": 0.25}}]}],
    "link": [{"nodes": ["A", "B"], "bandwidth_gbit_s": 0.1, "latency_ms": 20}],
}


def _chosen_sync(rank: int) -> dict:
    """What the trainer's hook builds for a two-site emulated pool, with and without islands."""
    pool = pool_from_dict(TWO_SITES)
    plan = data_parallel_plan(SPEC, {"a0": 3, "a1": 2, "b": 1}, seq_len=SEQ, micro_batch_size=4)
    params = list(build_model(SPEC).parameters())
    names = ["a0", "a1", "b"]
    sync = build_gradient_sync(plan, pool, params, rank=rank, rank_devices=names, share_fn=lambda: 1)
    islands = build_gradient_sync(replace(plan, sync=SyncPlan(islands=(("a0", "a1"), ("b",)), outer_every=4)),
                                  pool, params, rank=rank, rank_devices=names, share_fn=lambda: 1)
    return {"sync": (type(sync).__name__, sync.link is not None), "islands": islands.describe()}


def _worker(rank: int, world: int) -> dict:
    return {"diloco": _train(rank, "diloco"), "sync": _train(rank, "sync"),
            "hand": _outer_by_hand(rank, "none"), "hand_bf16": _outer_by_hand(rank, "bf16"),
            "chosen": _chosen_sync(rank)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, 3)


@pytest.mark.slow
def test_diloco_h1_equals_synchronous_training(results):
    ref = _reference()
    for rank, r in enumerate(results):
        for mode in ("diloco", "sync"):
            # Same arithmetic as the reference up to the order of float32 sums (per-rank partial
            # losses, two all-reduces): differences of a few ulp over 3 steps.
            for got, want in zip(r[mode], ref, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {mode}")


def _hand() -> list[list[float]]:
    g, buf, out = [1.0, 2.0], None, []
    moves, w, lr, m = ((-0.5, 0.5), (1.0, -1.0)), (0.75, 0.25), 0.7, 0.9
    local = [list(g), list(g)]
    for rnd in range(2):
        local = [[local[i][j] + moves[i][j] * (rnd + 1) for j in range(2)] for i in range(2)]
        d = [sum(w[i] * (g[j] - local[i][j]) for i in range(2)) for j in range(2)]
        buf = d if buf is None else [m * b + x for b, x in zip(buf, d, strict=True)]  # torch SGD momentum
        upd = [x + m * b for x, b in zip(d, buf, strict=True)]  # Nesterov
        g = [a - lr * u for a, u in zip(g, upd, strict=True)]
        local = [list(g), list(g)]
        out.append(g)
    return out


def test_outer_nesterov_step_matches_hand_computation(results):
    want = torch.tensor(_hand())
    for r in results:
        torch.testing.assert_close(torch.tensor(r["hand"]), want, rtol=1e-6, atol=1e-6)
        # bf16 keeps 8 bits of mantissa: the pseudo-gradient arrives within 2^-8 relative.
        torch.testing.assert_close(torch.tensor(r["hand_bf16"]), want, rtol=1e-2, atol=1e-2)


def test_trainer_hook_follows_plan_and_pool(results):
    for rank, r in enumerate(results):
        # Synchronous plan on an emulated pool spanning two sites: reduced per site, and only the
        # site leaders (ranks 0 and 2) hold the emulated 100 Mbit/s link.
        assert r["chosen"]["sync"] == ("HierarchicalSync", rank in (0, 2))
        d = r["chosen"]["islands"]
        assert d["mode"] == "islands" and d["outer_every"] == 4 and d["groups"] == [[0, 1], [2]]
        assert ("link" in d) == (rank in (0, 2))
        if "link" in d:
            assert d["link"]["bandwidth_bytes_s"] == 0.1e9 / 8 and d["link"]["latency_s"] == 0.02


def test_bad_settings_are_refused():
    with pytest.raises(PlanError, match="compression"):
        DiLoCo([torch.nn.Parameter(torch.zeros(1))], groups=None, global_samples=1,  # type: ignore[arg-type]
               share_fn=lambda: 1, inner_steps=1, compression="int3")
    with pytest.raises(PlanError, match="islands"):
        make_island_groups([[0], [0]], rank=0, world_size=2)
