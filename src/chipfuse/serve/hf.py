"""A Hugging Face decoder folder, cut into serving stages.

A serving stage is training's stage module: built by the family's builder on the meta device
(model/build.py, the architecture's row in model/families/hf.py says where each piece lives) and
loaded with model/weights.py, the reader `--init-from` uses, which reads only the stage's tensors.
`StageModel` only adapts it to serving: no gradients, the compute dtype, one sequence at a time
through the stage's forward with a transformers DynamicCache, the last position's logits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError
from chipfuse.model.init import get


@contextmanager
def model_folder(model: str | Path) -> Iterator[Path]:
    """The Hugging Face folder to serve `--model` from: the folder itself, or for a chipfuse training
    checkpoint (a folder with manifest.json) its `chipfuse export` into a temporary folder, removed after."""
    p = Path(model)
    if (p / "config.json").is_file():
        yield p
        return
    if not (p / "manifest.json").is_file():
        raise ChipfuseError(f"{p}: neither a Hugging Face model folder (no config.json) nor a chipfuse checkpoint (no "
                            "manifest.json). Fix: give --model a model folder or a checkpoint folder "
                            "(RUN_DIR/checkpoints/step_NNNNNN)")
    from chipfuse.model.export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="chipfuse-export-") as tmp:
        res = export_checkpoint(p, Path(tmp) / "export")  # one reader of checkpoints: `chipfuse export`'s
        if not res["tokenizer_files"]:
            raise ChipfuseError(f"{p}: the checkpoint records no tokenizer folder. Fix: `chipfuse export {p} --out DIR "
                                "--tokenizer TOKENIZER_DIR`, then give --model DIR")
        # The folder's name is the model's name (ModelSpec, /v1/models): the trained model's, not a random one.
        named = Path(tmp) / (str(res["model"]).replace("/", "_") or "model")
        (Path(tmp) / "export").rename(named)
        yield named


@dataclass(frozen=True, kw_only=True)
class _Part:
    """The part of a stage the builder reads (model.split.StagePart); serving keeps no activations."""

    layers: range
    checkpoint: str = "none"


class StageModel:
    """One serving stage: layers [first_layer, first_layer + num_layers) of the folder's model, with the
    embedding on the first stage and the final norm and head on the last."""

    def __init__(self, model_dir: str | Path, first_layer: int, num_layers: int, *, dtype: torch.dtype = torch.float32):
        from chipfuse.model.build import build_stage
        from chipfuse.model.hf import HFStage

        d = Path(model_dir)
        spec = model_spec(d)
        L = spec.num_layers
        if first_layer < 0 or num_layers < 1 or first_layer + num_layers > L:
            raise ChipfuseError(f"{d}: stage layers {first_layer}..+{num_layers} outside the model's {L} layers. "
                                "Fix: re-plan for this model")
        mine = range(first_layer, first_layer + num_layers)
        # The builder reads whether the stage is first or last from its place among the model's stages.
        parts = tuple(_Part(layers=r) for r in (range(first_layer), mine, range(mine.stop, L)) if len(r))
        module = build_stage(spec, parts, int(first_layer > 0), init_from=str(d))
        assert isinstance(module, HFStage), "a folder's config.json is served by its Hugging Face row"
        with torch.no_grad():
            for p in module.parameters():  # weights in the compute dtype; computed buffers (rotary) stay fp32
                p.data = p.data.to(dtype)
        self.module = module.eval()
        self.config = module.config
        self.first, self.last, self.layer_ids = module.first, module.last, module.layer_ids

    @property
    def blocks(self) -> list[nn.Module]:
        """The stage's decoder layers (what weight-only quantisation changes)."""
        return list(get(self.module, self.module.lay.layers).values())

    @property
    def head(self) -> nn.Module | None:
        return get(self.module, self.module.lay.head) if self.last else None

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cache: Any, *, logits: bool = True) -> torch.Tensor:
        """One sequence continued: x is token ids [1, T] on the first stage, hidden states [1, T, h] after
        it; `cache` holds what came before. Returns hidden states, or on the last stage (unless `logits` is
        False) the logits of the last position [V] in fp32."""
        m = self.module
        h = m.run_layers(m.pre(x, cache), cache)
        if not m.last or not logits:
            return h
        return m.final(h[:, -1:])[0, -1].float()


def model_spec(model_dir: str | Path):
    """The planner's view of a model folder (chipfuse.model.spec reads its config.json)."""
    from chipfuse.model.configs import from_hf_config

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ChipfuseError(f"{d}: no config.json. Fix: give a Hugging Face model folder (config.json + safetensors)")
    return from_hf_config(d / "config.json")


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    d = Path(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError, TypeError) as e:
        raise ChipfuseError(f"{d}: no usable tokenizer ({str(e).splitlines()[0][:120]}). Fix: put the model's "
                            "tokenizer files (tokenizer.json, tokenizer_config.json) in the folder") from None
