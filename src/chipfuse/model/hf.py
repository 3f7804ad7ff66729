"""Hugging Face decoder-only models (transformers) split into pipeline stages.

The model is transformers' own, built from its config through the Auto classes on the meta
device; a stage keeps transformers' modules (embedding, decoder layers, rotary / learned
positions, final norm, head) under their full names and runs them the way the architecture's
own forward does (its family's Layout says where each piece lives, model/families/), so a stage computes what
transformers computes: the same masks (transformers' masking_utils), the same attention
implementation, Gemma's embedding scale (inside its embedding module) and final-logit soft-cap.

Rotary embeddings are not passed between stages: every stage holds its own copy of the
parameter-free rotary module and recomputes (cos, sin) from the positions, so that stages
exchange one tensor only.

The same stage serves (chipfuse.serve): given a transformers Cache (a DynamicCache over the whole
model's layers, one per sequence), its forward continues the sequence the cache holds. Positions
start after the cached ones and the masks come from masking_utils sized by this stage's own
layers' part of the cache (the other stages' layers stay empty in it), as transformers' own
forward with a cache computes them.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn as nn

from chipfuse.errors import ChipfuseError
from chipfuse.model.arch import Layout
from chipfuse.model.init import InitFn, get, init_by_name, materialise, put
from chipfuse.model.registry import family_of, layout_of
from chipfuse.model.spec import ModelSpec
from chipfuse.model.split import EMBED_UNIT, HEAD_UNIT, StageModule, StagePart, block_unit, tied_keys


def hf_config(spec: ModelSpec) -> Any:
    """transformers' config of the spec, from its family's Hugging Face config (Family.hf_config: the
    spec's own config.json, or a Llama of a preset's numbers)."""
    fam = family_of(spec)
    if fam.hf_config is None:
        raise ChipfuseError(f"model {spec.name!r}: {fam.label} is not a Hugging Face model. "
                            "Fix: give --model a Hugging Face config.json")
    from transformers import AutoConfig

    fields = fam.hf_config(spec)
    cfg = AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})
    cfg.use_cache = False
    return cfg


def meta_model(spec: ModelSpec) -> nn.Module:
    """transformers' model of the spec on the meta device: structure and names, no memory."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    # No init on meta (it would be thrown away); materialise() initialises the kept part by name.
    with torch.device("meta"), no_init_weights():
        # fp32 master weights whatever dtype the config was saved in; the plan's dtype casts compute.
        return AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)


def hf_init(model: nn.Module) -> InitFn:
    """transformers' own initialisation of the architecture (its _init_weights: std, zero
    norms where the norm scales by 1 + weight, rotary inverse frequencies and other buffers)."""
    fn: Any = model._init_weights

    def init(name: str, m: nn.Module) -> None:
        fn(m)

    return init


def check_covered(full: nn.Module, lay: Layout, model_type: str) -> None:
    """Refuse an architecture whose parameters are not all in one of the stage pieces."""
    roots = (lay.embed, lay.layers, *lay.first, *lay.last, lay.head)
    stray = [n for n, _ in full.named_parameters() if not any(n == r or n.startswith(r + ".") for r in roots)]
    if stray:
        raise ChipfuseError(f"model_type {model_type!r}: parameters {stray[:3]} belong to no stage piece of "
                            "chipfuse's split. Fix: use a supported architecture (model/families/hf.py)")


class HFStage(StageModule):
    """A contiguous run of a transformers decoder's layers, with the first / last stage's pieces."""

    config: Any

    def __init__(self, full: nn.Module, lay: Layout, stage: StagePart, *, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.checkpoint_mode = first, last, stage.checkpoint
        self.kind, self.lay = lay.kind, lay
        self.config = full.config
        all_tied = tied_keys(full)
        layers = get(full, lay.layers)
        base_path = lay.layers.rsplit(".", 1)[0]
        self._first = [n for n in lay.first if get(full, n) is not None] if first else []
        self._last = [n for n in lay.last if get(full, n) is not None] if last else []
        if first:
            put(self, lay.embed, get(full, lay.embed))
            for n in self._first:
                put(self, n, get(full, n))
        put(self, lay.layers, nn.ModuleDict({str(i): layers[i] for i in stage.layers}))
        # Parameter-free children of the decoder (rotary embeddings): every stage keeps its own.
        self._shared = []
        for n, m in get(full, base_path).named_children():
            path = f"{base_path}.{n}"
            if path != lay.layers and path not in lay.first and path not in lay.last and path != lay.embed \
                    and not any(True for _ in m.parameters()):
                put(self, path, m)
                self._shared.append(path)
        if last:
            for n in self._last:
                put(self, n, get(full, n))
            put(self, lay.head, get(full, lay.head))
        mine = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        self.tied = {t: s for t, s in all_tied.items() if t in mine or s in mine}
        self._rotary_takes_type = False
        rot = get(self, f"{base_path}.rotary_emb")
        if rot is not None:
            self._rotary_takes_type = "layer_type" in inspect.signature(rot.forward).parameters
        self._base_path = base_path
        self.layer_ids = list(stage.layers)
        # transformers 5.x renamed the layers' cache keyword (past_key_values -> cache).
        sig = inspect.signature(layers[self.layer_ids[0]].forward).parameters
        self._cache_kw = "cache" if "cache" in sig else "past_key_values"

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Training: the whole sequence, no cache. Serving: `cache` (a transformers Cache) holds the
        sequence so far; x continues it, and this stage's layers read and extend their part."""
        return self.body(self.pre(x, cache), cache)

    def past(self, cache: Any) -> int:
        """Positions the cache already holds, read at this stage's first layer (0 without a cache)."""
        return int(cache.get_seq_length(self.layer_ids[0])) if cache is not None else 0

    def _positions(self, x: torch.Tensor, cache: Any) -> torch.Tensor:
        start = self.past(cache)
        return torch.arange(start, start + x.shape[1], device=x.device)[None, :]

    # ------------------------------------------------------------------ forward pieces
    def pre(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        if not self.first:
            return x
        h = get(self, self.lay.embed)(x)
        if self.kind == "gpt2":
            h = h + get(self, "transformer.wpe")(self._positions(x, cache))
            drop = get(self, "transformer.drop")
            return drop(h) if drop is not None else h
        if self.kind == "opt":
            pos = self._positions(x, cache)
            ones = torch.ones(x.shape, device=x.device)
            pe = get(self, "model.decoder.embed_positions")(ones, self.past(cache), position_ids=pos)
            proj = get(self, "model.decoder.project_in")
            return (proj(h) if proj is not None else h) + pe
        return h

    def _masks(self, h: torch.Tensor, pos: torch.Tensor, cache: Any) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cfg = self.config
        types = cfg.layer_types if self.lay.masks == "by_layer_type" else None
        am = None
        if self.kind == "opt":
            am = torch.ones(h.shape[0], self.past(cache) + h.shape[1], device=h.device)
        # Passed by position: the cache's keyword was renamed across transformers 5.x. With a cache,
        # each mask is sized by this stage's first layer of its type (the cache's other layers are
        # other stages' and empty here).
        args = (cfg, h, am, cache)
        out: dict[str, Any] = {}
        if types is None:
            sliding = self.lay.masks == "window" and getattr(cfg, "sliding_window", None) is not None
            fn = create_sliding_window_causal_mask if sliding else create_causal_mask
            at = {"layer_idx": self.layer_ids[0]} if cache is not None else {}
            out["full_attention"] = fn(*args, position_ids=pos, **at)
            return out
        for lt, fn in (("full_attention", create_causal_mask), ("sliding_attention", create_sliding_window_causal_mask)):
            mine = [i for i in self.layer_ids if types[i] == lt]
            if mine:
                at = {"layer_idx": mine[0]} if cache is not None else {}
                out[lt] = fn(*args, position_ids=pos, **at)
        return out

    def body(self, h: torch.Tensor, cache: Any = None) -> torch.Tensor:
        h = self.run_layers(h, cache)
        return self.final(h) if self.last else h

    def run_layers(self, h: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """This stage's decoder layers (with a cache: attending to and extending their part of it)."""
        pos = self._positions(h, cache)
        masks = self._masks(h, pos, cache)
        types = self.config.layer_types if self.lay.masks == "by_layer_type" else None
        rot = get(self, f"{self._base_path}.rotary_emb")
        pe_cache: dict[str, Any] = {}
        for key, blk in get(self, self.lay.layers).items():
            lt = types[int(key)] if types else "full_attention"
            kw: dict[str, Any] = {"attention_mask": masks[lt], "position_ids": pos}
            if cache is not None:
                kw.update({self._cache_kw: cache, "use_cache": True})
            if rot is not None:
                if lt not in pe_cache:
                    pe_cache[lt] = rot(h, pos, lt) if self._rotary_takes_type else rot(h, pos)
                kw["position_embeddings"] = pe_cache[lt]
            h = self._run_block(_LayerCall(blk, kw), h)
        return h

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The last stage's final norm, head and logit soft-cap (of the positions given)."""
        for n in self._last:
            h = get(self, n)(h)
        logits = get(self, self.lay.head)(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _unit_of(self, name: str) -> str:
        lay = self.lay
        if name.startswith(lay.layers + "."):
            return block_unit(int(name[len(lay.layers) + 1:].split(".")[0]))
        if any(name.startswith(p + ".") for p in (lay.embed, *lay.first)):
            return EMBED_UNIT
        return HEAD_UNIT


class _LayerCall:
    """One decoder layer with its keyword inputs bound, as one callable of the hidden states
    (what activation checkpointing wraps). Layers return a tensor or a tuple led by it."""

    def __init__(self, layer: nn.Module, kwargs: dict[str, Any]):
        self.layer, self.kwargs = layer, kwargs

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def build_full(spec: ModelSpec, seed: int) -> nn.Module:
    """transformers' whole model, initialised by name as every stage is."""
    model = meta_model(spec)
    model.tied = tied_keys(model)  # type: ignore[assignment]
    materialise(model, hf_init(model), seed)
    return model


def build_stage(spec: ModelSpec, stage: StagePart, *, first: bool, last: bool, seed: int, full: nn.Module | None,
                device: str | torch.device) -> StageModule:
    lay = layout_of(spec)
    if full is not None:
        return HFStage(full, lay, stage, first=first, last=last)
    meta = meta_model(spec)
    check_covered(meta, lay, str(spec.model_type or spec.family))
    mod = HFStage(meta, lay, stage, first=first, last=last)
    materialise(mod, hf_init(meta), seed, device=device)
    _init_tied_copies(mod, meta, seed)
    return mod


def _init_tied_copies(mod: HFStage, meta: nn.Module, seed: int) -> None:
    """The last stage's copy of a tied matrix starts as the embedding does: the embedding's own
    init, under the embedding's seed, written straight into the copy (no second matrix)."""
    names = dict(mod.named_parameters())
    for target, source in mod.tied.items():
        if target in names and source not in names:
            src_module = source.rsplit(".", 1)[0]
            twin = copy.deepcopy(get(meta, src_module))
            twin.weight = names[target]
            init_by_name_one(twin, hf_init(meta), seed, src_module)


def init_by_name_one(module: nn.Module, init_fn: InitFn, seed: int, name: str) -> None:
    """init_by_name for a module standing in for `name` (its children keep their own names)."""
    wrapper = nn.Module()
    put(wrapper, name, module)
    init_by_name(wrapper, lambda n, m: init_fn(n, m) if n.startswith(name) else None, seed)
