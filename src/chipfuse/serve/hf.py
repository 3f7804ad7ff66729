"""A Hugging Face decoder folder, cut into serving stages: each rank builds the model on the meta device
and loads from the safetensors only the tensors of its own layers.

Where the embedding, decoder layers, positions, final norm, head and rotary module live is the
architecture's layout (chipfuse.model.registry.layout_of, the row training's stage split reads too), so an
architecture added there is trained and served alike.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError
from chipfuse.model.hf import check_covered
from chipfuse.model.init import get
from chipfuse.model.registry import layout_of


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


def read_config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ChipfuseError(f"{d}: no config.json. Fix: give a Hugging Face model folder (config.json + safetensors)")
    try:
        return AutoConfig.from_pretrained(str(d))
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ChipfuseError(f"{d / 'config.json'}: transformers cannot read it ({str(e).splitlines()[0]}). "
                            "Fix: give the config.json of a transformers decoder model") from None


def _weight_files(d: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the one file."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ChipfuseError(f"{index}: no weight_map ({e}). Fix: re-save the model with save_pretrained") from None
        return {k: d / v for k, v in wm.items()}
    one = d / "model.safetensors"
    if not one.is_file():
        raise ChipfuseError(f"{d}: no model.safetensors nor model.safetensors.index.json. "
                            "Fix: save the model with save_pretrained (safe_serialization)")
    from safetensors import safe_open

    with safe_open(str(one), framework="pt") as f:
        return {k: one for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


class StageModel(nn.Module):
    """The part of a causal LM one serving stage runs: [embedding] + layers[first:last] + [norm + head]."""

    def __init__(self, model_dir: str | Path, first_layer: int, num_layers: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoModelForCausalLM

        d = Path(model_dir)
        self.config = read_config(d)
        self.config._attn_implementation = "sdpa"  # one sequence at a time: no mask, causal in prefill
        L = self.config.num_hidden_layers
        if first_layer < 0 or num_layers < 1 or first_layer + num_layers > L:
            raise ChipfuseError(f"{d}: stage layers {first_layer}..+{num_layers} outside the model's {L} layers. "
                                "Fix: re-plan for this model")
        spec = model_spec(d)
        lay = layout_of(spec)
        if lay.kind not in ("rotary", "gpt2"):
            raise ChipfuseError(f"{d}: model_type {spec.model_type!r} is trained by chipfuse but not served yet (its "
                                "learned positions start at an offset). Fix: serve a Llama-, Qwen-, Mistral-, Gemma- "
                                "or GPT-2-style model")
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        check_covered(full, lay, str(spec.model_type))
        self.lay = lay
        self.first, self.last = first_layer == 0, first_layer + num_layers == L
        self.layer_ids = list(range(first_layer, first_layer + num_layers))
        blocks = get(full, lay.layers)
        self.blocks = nn.ModuleList([blocks[i] for i in self.layer_ids])
        self.embed = get(full, lay.embed) if self.first else None
        # The first stage's learned positions (GPT-2's wpe), the last stage's final norm: present pieces only.
        self.pos = nn.ModuleList([m for n in lay.first if (m := get(full, n)) is not None] if self.first else [])
        self.post = nn.ModuleList([m for n in lay.last if (m := get(full, n)) is not None] if self.last else [])
        self.head = get(full, lay.head) if self.last else None
        self.rotary = None
        rot = get(full, lay.rotary) if lay.rotary else None
        if rot is not None:
            self.rotary = type(rot)(config=self.config)  # its inv_freq buffer is computed, not stored
        self._load(d, full, dtype)
        self.eval()
        sig = inspect.signature(self.blocks[0].forward).parameters
        self._cache_kw = "cache" if "cache" in sig else "past_key_values"
        self._kw = {k for k in ("position_ids", "position_embeddings") if k in sig}

    def _load(self, d: Path, full: nn.Module, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        files = _weight_files(d)
        full_names = {id(m): n for n, m in full.named_modules()}
        wanted: dict[str, nn.Module] = {}
        for m in (self.embed, *self.pos, *self.post, self.head, *self.blocks):
            if m is not None:
                wanted[full_names[id(m)]] = m
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        handles: dict[Path, Any] = {}
        for prefix, mod in wanted.items():
            mod.to_empty(device="cpu")
            for kind, tensors in (("parameter", mod.named_parameters()), ("buffer", mod.named_buffers())):
                for name, t in tensors:
                    key = f"{prefix}.{name}"
                    src = key
                    if src not in files and tied and prefix == self.lay.head:
                        src = f"{self.lay.embed}.{name}"  # tied head: the embedding's matrix
                    if src not in files:
                        if kind == "buffer":
                            raise ChipfuseError(f"{d}: buffer {key} is not in the safetensors and chipfuse cannot "
                                                "rebuild it. Fix: this architecture is not supported for serving yet")
                        raise ChipfuseError(f"{d}: tensor {key} is missing from the safetensors. "
                                            "Fix: re-save the complete model with save_pretrained")
                    f = handles.get(files[src]) or handles.setdefault(files[src], safe_open(str(files[src]), "pt"))
                    got = f.get_tensor(src)
                    if tuple(got.shape) != tuple(t.shape):
                        raise ChipfuseError(f"{files[src]}: tensor {src} has shape {tuple(got.shape)}, the config "
                                            f"makes {tuple(t.shape)}. Fix: use the config.json saved with these weights")
                    with torch.no_grad():
                        t.copy_(got.to(t.dtype))

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int, cache: Any, *, logits: bool = True) -> torch.Tensor:
        """One sequence: x is token ids [1, T] on the first stage, hidden states [1, T, h] after it.
        Returns hidden states, or on the last stage (unless `logits` is False) the logits of the last
        position [V] in fp32."""
        T = x.shape[1]
        pos = torch.arange(start, start + T).unsqueeze(0)
        if self.embed is not None:
            x = self.embed(x)
            for p in self.pos:
                x = x + p(pos)
        # A whole prompt (start 0) or one decode token needs no mask (SDPA's causal flag / nothing); a later
        # chunk of a prompt does: its queries see the cached positions and their own causal part, while
        # SDPA's causal flag aligns to the top-left corner and would hide the cache.
        mask = torch.ones(T, start + T, dtype=torch.bool).tril(start)[None, None] if start and T > 1 else None
        kw: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "attention_mask": mask}
        if "position_ids" in self._kw:
            kw["position_ids"] = pos
        if self.rotary is not None:
            kw["position_embeddings"] = self.rotary(x, pos)
        for blk in self.blocks:
            out = blk(x, **kw)
            x = out[0] if isinstance(out, tuple) else out
        if self.head is None or not logits:
            return x
        x = x[:, -1:]
        for m in self.post:
            x = m(x)
        return self.head(x)[0, -1].float()


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
