"""Unequal data parallelism equals one device on the same global batch.

Runs through the trainer's own worker (runtime.parallel.pipeline.PipelineWorker): a data-parallel
replica is a pipeline of one stage."""

import pytest
import torch

from chipfuse.data import get_batch
from chipfuse.model.gpt import build_model, loss_sum
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from tests.distributed import run_ranks
from tests.pipeline_helpers import plan_of, pool_of, run_steps

SPEC = SPEC_PRESETS["tiny"]
SHARES = [5, 2, 1]  # uneven three-way split of a global batch of 8
MICRO = [5, 1, 1]  # the second replica accumulates over two micro-batches
GLOBAL = sum(SHARES)
DEVICES = ["a", "b", "c"]
PLAN = plan_of(SPEC, [([(d, SPEC.num_layers)], n, m) for d, n, m in zip(DEVICES, SHARES, MICRO, strict=True)],
               seq_len=SPEC.seq_len)
POOL = pool_of({d: ("cpu", 1.0) for d in DEVICES})


def _reference():
    model = build_model(SPEC, seed=0)
    x, y = get_batch(0, GLOBAL, SPEC.seq_len)
    loss = loss_sum(model(x), y) / (GLOBAL * SPEC.seq_len)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank, world):
    out = run_steps(rank, world, PLAN, POOL, 1, WorkerConfig(pace=False, memory_caps=False))
    return out["losses"][0], out["grads"]


@pytest.mark.slow
def test_uneven_split_with_accumulation_matches_single_device():
    ref_loss, ref_grads = _reference()
    results = run_ranks(_rank, 3)
    loss = results[0][0]  # the step's global mean loss, the same on every rank
    # Only the order of float32 additions differs (per-rank partial sums, then a 3-way sum), so
    # the loss agrees to a few ulps and gradients to ~1e-6 relative: far tighter than any real bug
    # (a wrong weight or a missing sample changes gradients by >1e-2 relative).
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-6, atol=1e-7)
    for rank_grads in (r[1] for r in results):
        assert rank_grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(rank_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_plain_average_would_be_wrong():
    """Guard against a vacuous parity test: averaging per-rank mean gradients (what DDP does)
    differs from the global-batch gradient when shares are unequal."""
    _, ref = _reference()
    model = build_model(SPEC, seed=0)
    grads = []
    for rank in range(3):
        model.zero_grad()
        x, y = get_batch(0, GLOBAL, SPEC.seq_len, start=sum(SHARES[:rank]), count=SHARES[rank])
        (loss_sum(model(x), y) / (SHARES[rank] * SPEC.seq_len)).backward()
        grads.append(model.head.weight.grad.clone())
    naive = sum(grads) / 3
    assert not torch.allclose(naive, ref["head.weight"], rtol=1e-3, atol=1e-6)
