"""Stage modules for the runtime: the model package builds them (chipfuse.model.split for any
family, chipfuse.model.hf for Hugging Face architectures); this module is the runtime's one
import point, so the workers keep calling `build_stage(spec, stages, index, seed=...)`."""

from __future__ import annotations

from chipfuse.model.hf import hf_config
from chipfuse.model.split import (
    EMBED_UNIT,
    HEAD_UNIT,
    TIED_UNIT,
    GPTStage,
    StageModule,
    block_unit,
    build_full,
    build_stage,
    full_logits,
    has_tied_unit,
)

__all__ = ["EMBED_UNIT", "HEAD_UNIT", "TIED_UNIT", "GPTStage", "StageModule", "block_unit", "build_full",
           "build_stage", "full_logits", "has_tied_unit",
           "hf_config"]
