"""The recipe (runtime/train/recipe.py): learning-rate schedule, weight-decay groups, and clipping by
the global norm of the fully reduced gradient, checked against one process running
torch.nn.utils.clip_grad_norm_ on the whole batch: over 2 pipeline stages x 2 unequal replicas,
and over FSDP2 shards with unequal shares."""

from __future__ import annotations

import math

import pytest
import torch

from chipfuse.data import get_batch
from chipfuse.errors import ChipfuseError
from chipfuse.model.build import build_full, full_logits
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.runtime.parallel.pipeline import PipelineWorker, WorkerConfig
from chipfuse.runtime.train.recipe import Recipe, RecipeStep, decay_groups, global_grad_norm, unit_owner
from tests.distributed import run_ranks
from tests.pipeline_helpers import TINY_GPT, plan_of, pool_of

CFG = WorkerConfig(pace=False, lr=3e-3)


def test_warmup_then_cosine_to_min_lr():
    r = Recipe(lr=1.0, schedule="cosine", warmup_steps=4, min_lr=0.1)
    assert [r.lr_at(s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert r.lr_at(4, 20) == 1.0  # decay starts where warm-up ends
    assert r.lr_at(12, 20) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert r.lr_at(20, 20) == pytest.approx(0.1) and r.lr_at(30, 20) == pytest.approx(0.1)
    lrs = [r.lr_at(s, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert Recipe(lr=2.0, schedule="cosine").final_lr == 0.2  # default min_lr: lr / 10
    assert Recipe(lr=2.0, schedule="cosine", decay_steps=10).lr_at(10, 1000) == pytest.approx(0.2)
    assert {Recipe(lr=0.5).lr_at(s, 9) for s in range(9)} == {0.5}  # constant: today's behaviour


def test_bad_recipe_is_refused():
    for bad in (Recipe(lr=-1.0), Recipe(grad_clip=float("nan")), Recipe(lr=1.0, min_lr=2.0),
                Recipe(decay_steps=0)):
        with pytest.raises(ChipfuseError, match="Fix"):
            bad.check()


def test_weight_decay_spares_biases_and_norms():
    model = build_model(TINY_GPT)
    decay, no_decay = decay_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _reference(plan, max_norm: float, loader=None) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the whole global batch, torch's clip_grad_norm_."""
    torch.manual_seed(0)
    model = build_full(TINY_GPT, CFG.seed)
    x, y = loader.batch(0) if loader else get_batch(0, plan.global_batch, plan.seq_len, seed=CFG.data_seed)
    (loss_sum(full_logits(model, x), y) / (plan.global_batch * plan.seq_len)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _pipeline_clip(rank: int, world: int, plan, pool, max_norm: float) -> dict:
    w = PipelineWorker(plan, pool, rank=rank, config=CFG)
    step = RecipeStep(Recipe(lr=CFG.lr, grad_clip=max_norm), w.opt, total_steps=1,
                      params=list(w.module.parameters()), owns=unit_owner(w.unit_params, w.unit_ranks, rank))
    w.forward_backward(0)
    w.reduce_grads()
    stats = step.before_update(0)
    return {"norm": stats["grad_norm"], "grads": w.grads(), "clipped": step.clipped_steps}


@pytest.mark.slow
def test_clip_over_two_stages_times_two_unequal_replicas_matches_one_process():
    # 4 ranks are unavoidable: 2 stages x 2 replicas, split differently (1+2 and 2+1 layers), shares 5
    # and 3. Each layer's gradient lives on 2 ranks (one per replica) after the reduction: counted
    # twice, the norm would come out ~sqrt(2) too large; one stage's layers missed, too small.
    pool = pool_of({"a0": ("cpu", 1.0), "a1": ("cpu", 1.0), "b0": ("cpu", 1.0), "b1": ("cpu", 1.0)})
    plan = plan_of(TINY_GPT, [([("a0", 1), ("a1", 2)], 5, 2), ([("b0", 2), ("b1", 1)], 3, 1)])
    norm, _ = _reference(plan, math.inf)
    max_norm = norm / 3  # well below the norm: clipping must engage
    ref_norm, ref_grads = _reference(plan, max_norm)
    results = run_ranks(_pipeline_clip, 4, plan, pool, max_norm)
    for r in results:
        # The same norm on every rank; it differs from the reference only by fp32 summation order of
        # the gradients (atol/rtol as the pipeline parity tests: a few ulps of a sum of ~10 terms).
        assert r["norm"] == pytest.approx(ref_norm, rel=1e-5)
        assert r["clipped"] == 1
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def _fsdp_clip(rank: int, world: int, shares: list[int], max_norm: float) -> dict:
    from chipfuse.runtime.parallel.fsdp import apply_fsdp

    model = build_model(TINY_GPT, seed=CFG.seed)
    apply_fsdp(model, shard="full")
    G = sum(shares)
    x, y = get_batch(0, G, TINY_GPT.seq_len, start=sum(shares[:rank]), count=shares[rank])
    (loss_sum(model(x), y) / (G * TINY_GPT.seq_len)).backward()
    params = list(model.parameters())
    norm = global_grad_norm(params, owns=lambda p: True)  # every piece is a unique shard here
    opt = torch.optim.SGD(params, lr=0.0)
    step = RecipeStep(Recipe(lr=0.0, grad_clip=max_norm), opt, total_steps=1, params=params, owns=lambda p: True)
    step.before_update(0)
    return {"norm": norm, "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}


@pytest.mark.slow
def test_clip_over_fsdp_shards_with_unequal_shares_matches_one_process():
    shares = [5, 2]
    model = build_model(TINY_GPT, seed=CFG.seed)
    x, y = get_batch(0, sum(shares), TINY_GPT.seq_len)
    (loss_sum(model(x), y) / (sum(shares) * TINY_GPT.seq_len)).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    max_norm = norm / 4
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    results = run_ranks(_fsdp_clip, 2, shares, max_norm)
    for r in results:
        # reduce-scatter sums in another order than one backward: fp32 rounding only (as test_memory_parity)
        assert r["norm"] == pytest.approx(norm, rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def _group_clip_and_eval(rank: int, world: int, plan, pool, max_norm: float) -> dict:
    from chipfuse.data.loader import Loader
    from chipfuse.data.sources import builtin_source

    loader = Loader(builtin_source(), global_batch=plan.global_batch, seq_len=plan.seq_len, val_fraction=0.1)
    w = PipelineWorker(plan, pool, rank=rank, config=CFG, loader=loader)
    step = RecipeStep(Recipe(lr=CFG.lr, grad_clip=max_norm), w.opt, total_steps=1, params=list(w.module.parameters()),
                      owns=unit_owner(w.unit_params, w.unit_ranks, rank, members=w.role.members))
    w.forward_backward(0)
    w.reduce_grads()
    norm = step.before_update(0)["grad_norm"]
    grads = w.grads()
    val = torch.tensor([w.eval_loss_sum(*loader.val_share(w.offset, w.share))], dtype=torch.float64)
    torch.distributed.all_reduce(val)
    return {"norm": norm, "grads": grads, "val": float(val) / (loader.num_eval_samples * plan.seq_len)}


def _stage_group_plans():
    from chipfuse.plan.plan import Plan, Replica, Stage

    def plan(reps):
        return Plan(model=TINY_GPT, global_batch=sum(r.batch_share for r in reps), seq_len=32, replicas=tuple(reps))

    # Tensor parallel over two devices beside a one-device replica (unequal shares, groups of unequal size).
    tp = plan([Replica(stages=(Stage(devices=("t0", "t1"), first_layer=0, num_layers=3, tp_degree=2),),
                       batch_share=5, micro_batch_size=2),
               Replica(stages=(Stage(devices=("s0",), first_layer=0, num_layers=3),), batch_share=3,
                       micro_batch_size=3)])
    # A pipeline whose second stage is FSDP2-sharded over two devices.
    fsdp = plan([Replica(stages=(Stage(devices=("t0",), first_layer=0, num_layers=1),
                                 Stage(devices=("t1", "s0"), first_layer=1, num_layers=2, shard="full")),
                         batch_share=6, micro_batch_size=2)])
    return {"tp": tp, "fsdp": fsdp}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tp", "fsdp"])
def test_clip_and_validation_over_stage_groups_match_one_process(kind):
    # Clipping counts each layer once across replicas and each DTensor piece once inside a group;
    # validation runs forward only through the same worker (followers serve their leader, no
    # backward). Reference: one process, clip_grad_norm_, the whole validation set.
    from chipfuse.data.loader import Loader
    from chipfuse.data.sources import builtin_source

    plan = _stage_group_plans()[kind]
    pool = pool_of({"t0": ("cpu", 1.0), "t1": ("cpu", 1.0), "s0": ("cpu", 1.0)})
    loader = Loader(builtin_source(), global_batch=plan.global_batch, seq_len=plan.seq_len, val_fraction=0.1)
    norm, _ = _reference(plan, math.inf, loader)
    ref_norm, ref_grads = _reference(plan, norm / 3, loader)
    model = build_full(TINY_GPT, CFG.seed)
    x, y = loader.val_batch(0, loader.num_eval_samples)
    with torch.no_grad():
        ref_val = float(loss_sum(full_logits(model, x), y)) / (loader.num_eval_samples * plan.seq_len)
    for r in run_ranks(_group_clip_and_eval, 3, plan, pool, norm / 3):
        # fp32 summation order only (tensor-parallel halves, reduce-scatter): as test_stage_groups.
        assert r["norm"] == pytest.approx(ref_norm, rel=1e-5)
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        assert r["val"] == pytest.approx(ref_val, rel=1e-5)
