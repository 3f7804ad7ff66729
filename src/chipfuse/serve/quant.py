"""Weight-only int8/int4 for a stage's decoder layers (torchao), and the check that keeps it honest.

int8: one scale per output row (torchao Int8WeightOnlyConfig). int4: groups of 128 input weights (32 where
a layer's width is not a multiple of 128) with a scale and zero point each (torchao IntxWeightOnlyConfig).
On CPU torchao keeps int4 values unpacked in int8 bytes, so an emulated device's real memory halves only for
int8; the planner counts what the chip would hold (chipfuse.plan.serve.QUANT_BYTES).
The embedding, the final norm and the head stay in the compute dtype.

`quality_report` measures what quantisation costs on a fixed text: the whole model with the plan's
quantised layers against the same model unquantised, teacher-forced over every position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FIXED_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
              "step. To be, or not to be, that is the question.")


def quantize_blocks(blocks: Iterable[nn.Module], weight_dtype: str) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    for blk in blocks:
        if weight_dtype == "int8":
            quantize_(blk, Int8WeightOnlyConfig())
            continue
        for group in (128, 32):
            quantize_(blk, IntxWeightOnlyConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                                    granularity=PerGroup(group)),
                      filter_fn=lambda m, _f, g=group: isinstance(m, nn.Linear) and m.in_features % g == 0
                      and type(m.weight) is nn.Parameter and not hasattr(m.weight, "qdata"))


def quantize_layers(stage: Any, weight_dtype: str) -> None:
    """Quantise the decoder layers of a serving stage (chipfuse.serve.hf.StageModel) in place."""
    quantize_blocks(stage.blocks, weight_dtype)


def quality_report(model_dir: str | Path, plan: Any, text: str = FIXED_TEXT) -> dict[str, Any] | None:
    """Logit difference, perplexity and next-token agreement of the plan's quantised layers on `text`,
    against the same weights unquantised; None when the plan quantises nothing."""
    quant = {layer: s.weight_dtype for s in plan.stages if s.weight_dtype in ("int8", "int4") for layer in s.layers}
    if not quant:
        return None
    from transformers import AutoModelForCausalLM

    from chipfuse.model.init import get
    from chipfuse.model.registry import layout_of
    from chipfuse.serve.hf import load_tokenizer

    dtype = torch.bfloat16 if plan.dtype == "bf16" else torch.float32
    tok = load_tokenizer(model_dir)
    ids = torch.tensor([tok(text)["input_ids"][: plan.context_len]])

    def run(quantised: bool) -> torch.Tensor:
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True).eval()
        if quantised:
            blocks = get(m, layout_of(plan.model).layers)
            for wd in ("int8", "int4"):
                quantize_blocks([blocks[i] for i, w in quant.items() if w == wd], wd)
        with torch.no_grad():
            return m(ids).logits[0].float()

    ref, got = run(False), run(True)

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])))

    return {"quantised_layers": {str(k): v for k, v in sorted(quant.items())}, "text_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": float((got - ref).abs().max()),
            "relative_logit_diff": float((got - ref).norm() / ref.norm()),
            "perplexity_reference": ppl(ref), "perplexity_quantised": ppl(got),
            "next_token_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
