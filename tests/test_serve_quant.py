"""int8/int4 weight-only stages stay honest: their cost is measured against the unquantised weights."""

from __future__ import annotations

from dataclasses import replace

import torch

from chipfuse.cluster.builtin import default_pool
from chipfuse.plan.serve import fixed_plan
from chipfuse.serve.hf import StageModel, model_spec
from chipfuse.serve.quant import quality_report, quantize_layers
from tests.serve_models import tiny_model


def test_quantised_stage_reported_against_unquantised(tmp_path):
    d = tiny_model(tmp_path, "llama", layers=4)
    plan = fixed_plan(default_pool(), model_spec(d), {"fast": 2, "mid": 2}, context_len=64, dtype="fp32")
    assert quality_report(d, plan) is None  # nothing quantised, nothing to report
    reports = {}
    for wd in ("int8", "int4"):
        p = replace(plan, stages=(plan.stages[0], replace(plan.stages[1], weight_dtype=wd)))
        reports[wd] = r = quality_report(d, p)
        assert r is not None and r["quantised_layers"] == {"2": wd, "3": wd}
        assert r["perplexity_reference"] > 1 and r["perplexity_quantised"] > 1
    # int8 keeps one scale per row: within a few percent of the logits; int4 (groups of 32 here) drifts more.
    assert 0 < reports["int8"]["relative_logit_diff"] < 0.05
    assert reports["int4"]["relative_logit_diff"] > reports["int8"]["relative_logit_diff"]


def test_stage_worker_quantises_only_its_layers(tmp_path):
    d = tiny_model(tmp_path, "llama", layers=2)
    plain, quant = StageModel(d, 1, 1), StageModel(d, 1, 1)
    quantize_layers(quant, "int8")
    assert type(quant.blocks[0].mlp.up_proj.weight).__name__ != type(plain.blocks[0].mlp.up_proj.weight).__name__
    assert type(quant.head.weight) is type(plain.head.weight)  # the head stays in the compute dtype
    h = torch.randn(1, 5, 64)
    a, b = plain(h, plain.new_cache()), quant(h, quant.new_cache())
    assert float((a - b).norm() / a.norm()) < 0.05
