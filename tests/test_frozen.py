"""Frozen parameters (plan field `freeze`, model.converters): no gradient, no optimizer state, no
sync traffic, weights that do not move; the parallel result equals one device with the same units
frozen; the memory and cost models charge only what is trained.

Tolerances, and why (as in tests/test_pipeline.py and tests/test_stage_groups.py):
- step-0 gradients of trainable parameters: atol 1e-6 / rtol 1e-5 (layouts without a sharded group:
  the same sums in another order, a few ulps of values ~1e-2); 1e-5 / 1e-4 through an FSDP2 group,
  whose reduce-scatter adds its members' rows in yet another order.
- 10-step loss curves: atol 1e-4. Identical data and weights, so only rounding differs; a wrong
  share, a frozen weight that moved or a trainable one left out moves the loss by 1e-2 or more.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from chipfuse.cli import main
from chipfuse.cluster.pool import pool_from_dict
from chipfuse.data import get_batch
from chipfuse.errors import PlanError
from chipfuse.model.build import build_stage
from chipfuse.model.converters import apply_converters, frozen_units
from chipfuse.model.converters.freeze import match_units, with_freeze
from chipfuse.model.costs import model_costs
from chipfuse.model.gpt import loss_sum
from chipfuse.plan.cost import predict
from chipfuse.plan.memory import plan_memory
from chipfuse.plan.plan import Plan, Replica, Stage, SyncPlan
from chipfuse.runtime.endure import checkpoint
from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig
from chipfuse.runtime.sync.grad_sync import UnitSync, build_gradient_sync
from chipfuse.runtime.train.optim import build_optimizer
from tests.distributed import run_ranks
from tests.pipeline_helpers import TINY_GPT, TINY_LLAMA, plan_of, pool_of

STEPS = 10
CFG = WorkerConfig(pace=False, lr=3e-3)  # pacing only sleeps; it changes no number
FREEZE = ("embed", "block0")
POOL = pool_of({"a": ("cpu", 1.0), "b": ("cpu", 1.0)})


def _frozen_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------ refusals: one line, naming the flag


def test_a_bad_pattern_is_refused_naming_the_flag_and_the_fix() -> None:
    plan = plan_of(TINY_GPT, [([("a", 3)], 4, 2)])
    with pytest.raises(PlanError, match=r"^--freeze: 'blok1' names no unit of model 'tiny' .*Fix: name units"):
        with_freeze(plan, "embed,blok1")
    with pytest.raises(PlanError, match=r"plan\.json: freeze: 'block7'"):
        Plan.from_dict({**plan.to_dict(), "freeze": ["block7"]}, source="plan.json")
    # Everything a stage holds frozen: nothing to train there.
    with pytest.raises(PlanError, match=r"stages\[0\] .* is frozen\. Fix:"):
        with_freeze(plan_of(TINY_GPT, [([("a", 1), ("b", 2)], 4, 1)]), "embed,block0")


def test_the_cli_refuses_a_bad_pattern_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("a", 3)], 4, 2)]).to_json(path)
    assert main(["plan", "--pool", "builtin", "--evaluate", str(path), "--freeze", "blocks.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--freeze: 'blocks.0' names no unit" in err and "Fix:" in err


def test_patterns_name_units() -> None:
    assert match_units(("block0-1", "head"), TINY_GPT, where="x") == {"block0", "block1", "head"}
    assert match_units(("block*",), TINY_GPT, where="x") == {"block0", "block1", "block2"}
    tied = replace(TINY_LLAMA, tie_embeddings=True)
    assert match_units(("embed",), tied, where="x") == {"embed", "tied"}  # the shared matrix is the embedding's


# ------------------------------------------------------------------ one worker: grads, optimizer, sync bytes


def _one_worker(freeze: tuple[str, ...]) -> PipelineWorker:
    torch.set_num_threads(1)
    plan = replace(plan_of(TINY_GPT, [([("a", 3)], 4, 2)]), freeze=freeze)
    return PipelineWorker(plan, pool_of({"a": ("cpu", 1.0)}), rank=0, config=CFG)


def test_a_frozen_parameter_gets_no_grad_no_state_and_does_not_move() -> None:
    w = _one_worker(FREEZE)
    frozen = _frozen_names(w.module)
    assert frozen == {n for n, _ in w.module.named_parameters() if n.startswith(("tok_emb", "pos_emb", "blocks.0."))}
    before = {n: p.detach().clone() for n, p in w.module.named_parameters()}
    for s in range(2):
        w.step(s)
    params = dict(w.module.named_parameters())
    for n in frozen:
        assert params[n].grad is None, n
        assert params[n] not in w.opt.state, n
        assert torch.equal(params[n], before[n]), n  # the frozen weights do not move
    assert all(not torch.equal(params[n], before[n]) for n in params if n not in frozen)  # the rest trains
    frozen_numel = sum(params[n].numel() for n in frozen)
    assert w.describe()["num_trainable_params"] == w.describe()["num_params"] - frozen_numel


def test_a_checkpoint_keeps_frozen_weights_and_no_state_for_them(tmp_path) -> None:
    w = _one_worker(FREEZE)
    for s in range(2):
        w.step(s)
    checkpoint.save(tmp_path, step=2, model=w.module, optimizer=w.opt, plan=w.plan.to_dict())
    after = [w.step(s)["loss"] for s in (2, 3)]
    resumed = _one_worker(FREEZE)  # same seed: move its weights first, so the load must overwrite them
    with torch.no_grad():
        for p in resumed.module.parameters():
            p.add_(1.0)
    r = checkpoint.load(tmp_path, model=resumed.module, optimizer=resumed.opt)
    assert r.step == 2 and len(resumed.opt.state) == len(resumed.trainable) < len(list(resumed.module.parameters()))
    # Same process, same kernels, same order: the resumed curve is the uninterrupted one, bit for bit.
    assert [resumed.step(s)["loss"] for s in (2, 3)] == after
    # Another freeze would hand the optimizer other tensors: refused, naming the field.
    with pytest.raises(checkpoint.CheckpointError, match="freeze=.*Fix:"):
        checkpoint.check_resumable(w.plan.to_dict(), replace(w.plan, freeze=("embed",)), "ckpt")


# ------------------------------------------------------------------ memory and cost models


def test_memory_prediction_drops_by_frozen_grads_and_state_and_bounds_the_meter() -> None:
    plain, w = _one_worker(()), _one_worker(FREEZE)
    for s in range(2):
        plain.step(s)
        w.step(s)
    (p_plain,), (p_frozen,) = plan_memory(plain.plan, POOL), plan_memory(w.plan, POOL)
    frozen_numel = sum(p.numel() for p in w.module.parameters() if not p.requires_grad)
    # fp32 gradients (4 B) and AdamW's two fp32 moments (8 B) per frozen parameter; parameters unchanged.
    assert p_plain.grads_bytes - p_frozen.grads_bytes == 4 * frozen_numel
    assert p_plain.optimizer_bytes - p_frozen.optimizer_bytes == 8 * frozen_numel
    assert p_frozen.params_bytes == p_plain.params_bytes
    assert w.peak_bytes() < plain.peak_bytes()
    assert w.peak_bytes() <= p_frozen.peak_bytes < p_plain.peak_bytes


def test_cost_model_prices_frozen_backward_and_sync() -> None:
    from chipfuse.cluster.builtin import default_pool

    pool = default_pool()
    names = [d.name for d in pool.devices][:2]
    plan = plan_of(TINY_GPT, [([(names[0], 3)], 4, 2), ([(names[1], 3)], 4, 2)])
    frozen = replace(plan, freeze=FREEZE)
    a, b = predict(plan, pool), predict(frozen, pool)
    sa, sb = a.breakdown["replicas"][0]["stages"][0], b.breakdown["replicas"][0]["stages"][0]
    assert sb["fwd_s"] == sa["fwd_s"]
    # One of three blocks frozen: it skips its weight gradients, half its matmuls' backward.
    costs = model_costs(TINY_GPT, plan.seq_len)
    assert sb["bwd_s"] == pytest.approx(sa["bwd_s"] * (1 - costs.frozen_backward_fraction / 3))
    # Optimizer and gradient sync: only the trainable parameters.
    share = costs.trainable_params(range(3), first=True, last=True, frozen=frozen_units(frozen)) / costs.total_params
    assert sb["opt_s"] == pytest.approx(sa["opt_s"] * share) and 0 < sb["sync_s"] < sa["sync_s"]
    assert b.step_s < a.step_s
    assert frozen_units(frozen) == {"embed", "block0"}


# ------------------------------------------------------------------ parity on 2 ranks against one device


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, gathered when FSDP2 shards it (collective inside the group)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _run(rank: int, world: int, plan: Plan) -> dict:
    w = PipelineWorker(plan, POOL, rank=rank, config=CFG)
    frozen = _frozen_names(w.module)
    before = {n: _whole(p) for n, p in w.module.named_parameters() if n in frozen}
    sync = UnitSync(w)
    w.opt.zero_grad(set_to_none=True)
    w.forward_backward(0)
    sync.reduce()
    grads = {n: g for n, g in w.grads().items() if n not in frozen}
    no_grad = all(p.grad is None for n, p in w.module.named_parameters() if n in frozen)
    losses = [w.step(s, sync)["loss"] for s in range(STEPS)]
    moved = [n for n, p in w.module.named_parameters() if n in frozen and not torch.equal(_whole(p), before[n])]
    return {"losses": losses, "grads": grads, "frozen": frozen, "no_grad": no_grad, "moved": moved,
            "state": len(w.opt.state), "trainable": len(w.trainable), "sent_bytes": sync.sent_bytes,
            "trainable_numel": sum(p.numel() for p in w.trainable),
            "numel": sum(p.numel() for p in w.module.parameters())}


def _reference(plan: Plan) -> dict:
    """One device, the whole model as one stage with the same converters, the whole global batch."""
    torch.set_num_threads(1)
    whole = (Stage(devices=("ref",), first_layer=0, num_layers=plan.model.num_layers),)
    model = build_stage(plan.model, whole, 0, seed=CFG.seed)
    apply_converters(model, plan)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], plan, lr=CFG.lr)
    tokens = plan.global_batch * plan.seq_len
    losses, grads = [], {}
    for s in range(STEPS):
        x, y = get_batch(s, plan.global_batch, plan.seq_len, seed=CFG.data_seed)
        opt.zero_grad(set_to_none=True)
        loss = loss_sum(model(x), y) / tokens
        loss.backward()
        if s == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


def _check(results: list[dict], ref: dict, *, atol: float, rtol: float) -> None:
    assert any(r["frozen"] for r in results)  # a later pipeline stage may hold no frozen unit
    for r in results:
        assert r["no_grad"] and not r["moved"] and r["state"] == r["trainable"]
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], atol=atol, rtol=rtol, msg=name)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), atol=1e-4, rtol=0)
    assert ref["losses"][-1] < ref["losses"][0] - 0.3  # it really trains


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data_parallel", "pipeline"])
def test_training_with_the_first_blocks_frozen_matches_one_device(layout: str) -> None:
    if layout == "data_parallel":  # unequal shares and micro-batches (replica 0's last is padded)
        plan = plan_of(TINY_GPT, [([("a", 3)], 5, 2), ([("b", 3)], 3, 1)])
    else:  # stage 0 holds the frozen embedding and block 0 and a trainable block 1
        plan = plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 4, 1)])
    plan = with_freeze(plan, ",".join(FREEZE))
    results = run_ranks(_run, 2, plan)
    _check(results, _reference(plan), atol=1e-6, rtol=1e-5)
    if layout == "data_parallel":
        # Both replicas hold every unit: each reduce sends the trainable fp32 gradients, nothing frozen
        # (one reduce for the step-0 gradients, then one per step).
        for r in results:
            assert r["sent_bytes"] == (STEPS + 1) * 4 * r["trainable_numel"] and r["trainable_numel"] < r["numel"]


@pytest.mark.slow
def test_a_sharded_group_with_frozen_units_matches_one_device() -> None:
    # FSDP2 over a group of two: block 0 wholly frozen, and the root unit mixes the frozen embedding
    # with the trainable head.
    st = Stage(devices=("a", "b"), first_layer=0, num_layers=3, shard="full")
    plan = Plan(model=TINY_GPT, global_batch=4, seq_len=32, replicas=(Replica(stages=(st,), batch_share=4,
                                                                              micro_batch_size=2),), freeze=FREEZE)
    plan.check()
    _check(run_ranks(_run, 2, plan), _reference(plan), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the flag on chipfuse train


def test_train_freeze_flag_reaches_the_plan_and_the_workers(tmp_path) -> None:
    assert main(["train", "--model", "tiny", "--dry-run", "--freeze", "embed, block0-1", "--run-dir",
                 str(tmp_path / "d")]) == 0
    assert Plan.from_json(tmp_path / "d" / "plan.json").freeze == ("embed", "block0-1")
    one = tmp_path / "one.toml"
    one.write_text('[[node]]\nname = "h"\n[[node.device]]\nname = "solo"\nchip = "cpu"\nemulate = { speed = 1.0 }\n')
    out = tmp_path / "one.json"
    assert main(["train", "--pool", str(one), "--model", "tiny", "--steps", "2", "--global-batch", "4",
                 "--solo-samples", "0", "--freeze", "embed,block0", "--run-dir", str(tmp_path / "r"),
                 "--json", str(out), "--no-progress"]) == 0
    import json

    summary = json.loads(out.read_text())
    assert summary["freeze"] == ["embed", "block0"]
    assert 0 < summary["num_trainable_params"] < summary["num_params"]


# ------------------------------------------------------------------ DiLoCo islands over an emulated slow link

TWO_SITES = pool_from_dict({
    "node": [{"name": "A", "device": [{"name": "a", "chip": "cpu", "emulate": {"speed": 1.0}}]},
             {"name": "B", "device": [{"name": "b", "chip": "cpu", "emulate": {"speed": 1.0}}]}],
    "link": [{"nodes": ["A", "B"], "bandwidth_gbit_s": 10, "latency_ms": 1}]}, source="<test pool>")


def _islands(rank: int, world: int, plan: Plan) -> dict:
    w = PipelineWorker(plan, TWO_SITES, rank=rank, config=CFG)
    frozen = _frozen_names(w.module)
    before = {n: _whole(p) for n, p in w.module.named_parameters() if n in frozen}
    sync = build_gradient_sync(plan, TWO_SITES, w.trainable, rank=rank, rank_devices=["a", "b"],
                               share_fn=lambda: w.share, default=UnitSync(w), worker=w)
    for s in range(2):
        w.step(s, sync)
        sync.after_step()
    moved = [n for n, p in w.module.named_parameters() if n in frozen and not torch.equal(_whole(p), before[n])]
    return {"payload_bytes": sync.describe()["link"]["payload_bytes"], "moved": moved,
            "trainable_numel": sum(p.numel() for p in w.trainable),
            "numel": sum(p.numel() for p in w.module.parameters())}


@pytest.mark.slow
def test_diloco_sends_only_trainable_parameters_over_the_slow_link() -> None:
    base = replace(plan_of(TINY_GPT, [([("a", 3)], 2, 2), ([("b", 3)], 2, 2)]),
                   sync=SyncPlan(islands=(("a",), ("b",)), outer_every=1))
    plain, frozen = (run_ranks(_islands, 2, p)[0] for p in (base, with_freeze(base, ",".join(FREEZE))))
    assert not frozen["moved"]  # the outer step moves only what trains
    assert frozen["trainable_numel"] < frozen["numel"] == plain["numel"]
    # Every outer step sends each trainable parameter's delta (fp32, no compression): the payload
    # scales with the trainable count exactly.
    assert frozen["payload_bytes"] * plain["trainable_numel"] == plain["payload_bytes"] * frozen["trainable_numel"]
    assert frozen["payload_bytes"] < plain["payload_bytes"]
