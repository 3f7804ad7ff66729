"""Hugging Face models (transformers, built from a config, no weights downloaded) split into stages."""

from __future__ import annotations

import pytest
import torch

from chipfuse.model.build import build_full, build_stage, full_logits
from chipfuse.model.configs import spec_from_config_dict
from chipfuse.runtime.parallel.pipeline import WorkerConfig
from tests.distributed import run_ranks
from tests.hf_tiny import TINY
from tests.pipeline_helpers import TINY_LLAMA, plan_of, pool_of, reference, run_steps


def test_llama_stages_compose_to_the_full_model():
    plan = plan_of(TINY_LLAMA, [([("a", 1), ("b", 1), ("c", 1)], 2, 1)])
    stages = plan.replicas[0].stages
    full = build_full(TINY_LLAMA, seed=0)
    idx = torch.randint(0, TINY_LLAMA.vocab_size, (2, 32))
    h = idx
    for i in range(3):
        h = build_stage(TINY_LLAMA, stages, i, seed=0)(h)
    # Same weights (same seed), same operations in the same order: bit-identical.
    torch.testing.assert_close(h, full_logits(full, idx), atol=0, rtol=0)
    names = set().union(*(dict(build_stage(TINY_LLAMA, stages, i).named_parameters()) for i in range(3)))
    assert names == set(dict(full.named_parameters()))  # every parameter in exactly one stage


@pytest.mark.slow
def test_tied_hf_pipeline_with_unequal_replicas_matches_transformers():
    """2 unequal stages (1 + 2 layers) in one replica, a whole-model replica beside it, shares
    5 : 3, on a Qwen2 (a Llama with q/k/v biases) whose head is tied to its embedding:
    transformers' loss and gradients, and one summed gradient for the tied matrix on the first
    stage and on the last stage's copy."""
    spec = spec_from_config_dict({**TINY["qwen2"], "max_position_embeddings": 32}, name="tiny-qwen2", source="t")
    pool = pool_of({"a0": ("cpu", 1.0), "a1": ("cpu", 1.0), "b0": ("cpu", 1.0)})
    plan = plan_of(spec, [([("a0", 1), ("a1", 2)], 5, 2), ([("b0", 3)], 3, 2)])
    cfg = WorkerConfig(pace=False, lr=3e-3)
    steps = 50
    results = run_ranks(run_steps, 3, plan, pool, steps, cfg)
    ref = reference(spec, plan, steps, cfg)  # transformers' Qwen2ForCausalLM, one device, whole batch
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    for r in results:
        for name, g in r["grads"].items():
            # fp32 sums of ~8 micro-batch terms in another order: a few ulps
            torch.testing.assert_close(g, ref["grads"][tied.get(name, name)], atol=1e-6, rtol=1e-5, msg=name)
        # 50 AdamW steps amplify rounding differences (see test_pipeline.py: up to 1.5e-4 measured)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), atol=5e-4, rtol=0)
    assert ref["losses"][-1] < ref["losses"][0] - 0.5
    first = next(r for r in results if r["describe"]["stage"] == 0 and r["describe"]["num_stages"] == 2)
    last = next(r for r in results if r["describe"]["stage"] == 1)
    assert "lm_head.weight" in last["grads"] and "lm_head.weight" not in first["grads"]
    # One all-reduced sum on both copies: bit-identical, so AdamW keeps them equal.
    torch.testing.assert_close(first["grads"]["model.embed_tokens.weight"], last["grads"]["lm_head.weight"],
                               atol=0, rtol=0)
