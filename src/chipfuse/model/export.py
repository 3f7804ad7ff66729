"""A whole model against a Hugging Face folder: `--init-from` checked before any worker starts, and
`chipfuse export` (a chipfuse checkpoint written as a Hugging Face folder).

Export: the checkpoint (DCP, runtime/endure/checkpoint.py) is read back in one process into
transformers' model of the checkpoint's plan, then written with transformers' own
`save_pretrained`, so `from_pretrained` finds exactly the keys it expects.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from chipfuse.errors import ChipfuseError
from chipfuse.model.build import build_full, runtime_of
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec
from chipfuse.model.split import tied_keys
from chipfuse.model.weights import copy_tokenizer, match_tensors


def check_init_from(spec: ModelSpec, directory: str | Path) -> None:
    """Refuse, before any worker starts, a folder whose weights do not fit `spec`: every tensor of
    the whole model checked from the headers, on the meta device (no memory)."""
    fam = family_of(spec)
    if not fam.hf_weights:
        raise ChipfuseError(f"--init-from {directory}: {fam.label} ({spec.name!r}) has no Hugging Face "
                            "weights. Fix: give --model the folder (or its config.json)")
    model = runtime_of(spec).meta_model(spec)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    match_tensors(shapes, directory, tied_keys(model))



def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Write a chipfuse checkpoint as a Hugging Face folder: config.json, safetensors, tokenizer."""
    import torch.distributed.checkpoint as dcp

    ck = Path(checkpoint)
    manifest_path = ck / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        spec = ModelSpec.from_dict(manifest["plan"]["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ChipfuseError(f"{manifest_path}: not a chipfuse checkpoint's manifest ({e}). Fix: give a "
                            "checkpoint folder (RUN_DIR/checkpoints/step_NNNNNN)") from None
    fam = family_of(spec)
    if not fam.hf_weights:
        raise ChipfuseError(f"{manifest_path}: plan.model.family: {spec.family!r} ({fam.label}) has no Hugging Face "
                            "architecture to export to. Fix: train a Hugging Face model (--model with a config.json "
                            "or model folder) to get a model back")
    model = build_full(spec, 0)
    params = {n: p for n, p in model.named_parameters()}  # a tied matrix once, under the embedding's name
    try:
        with warnings.catch_warnings():  # DCP notes that it loads in one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": params}, checkpoint_id=str(ck), no_dist=True)
    except Exception as e:  # DCP raises a bare RuntimeError/CheckpointException naming the missing keys
        raise ChipfuseError(f"{ck}: the checkpoint does not hold this model's weights ({str(e).splitlines()[0]}). "
                            "Fix: export a checkpoint written by `chipfuse train` for this model") from None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))  # type: ignore[operator]
    tok_src = tokenizer or manifest.get("extra", {}).get("tokenizer")
    copied = copy_tokenizer(tok_src, out_dir) if tok_src else []
    return {"checkpoint": str(ck), "out": str(out_dir), "model": spec.name, "model_type": getattr(model.config, "model_type", spec.model_type),
            "step": manifest.get("step"), "num_params": sum(p.numel() for p in params.values()),
            "tokenizer_files": copied}
