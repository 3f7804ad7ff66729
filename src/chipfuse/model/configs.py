"""Reading a model: a preset name, a Hugging Face config.json or a model folder, into a ModelSpec.

The config goes through transformers' AutoConfig, so that every field transformers fills by default
is the value the model is built with; its model_type's row (model/families/hf.py) reads the shape
and architecture fields, and chipfuse.validate checks the type and range of every one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chipfuse.errors import ChipfuseError
from chipfuse.model.registry import hf_family, model_types
from chipfuse.model.spec import SPEC_PRESETS, ModelSpec
from chipfuse.validate import model_spec


def _refuse_unsupported(c: Any, mt: str, source: str) -> None:
    if getattr(c, "is_encoder_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ChipfuseError(f"{source}: model_type {mt!r} has cross-attention; chipfuse splits decoder-only "
                            "models. Fix: use a decoder-only architecture")
    if getattr(c, "use_bidirectional_attention", False):
        raise ChipfuseError(f"{source}: use_bidirectional_attention: true is not a causal language model. "
                            "Fix: set it to false")


def hf_config_class_dict(raw: dict[str, Any], source: str) -> Any:
    """transformers' config object for a config.json's dict (AutoConfig, so defaults match)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ChipfuseError(f"{source}: reading a Hugging Face config needs transformers. "
                            "Fix: pip install 'chipfuse[hf]'") from None
    mt = raw.get("model_type")
    if not mt:
        raise ChipfuseError(f"{source}: field 'model_type' missing. Fix: a Hugging Face config.json names its "
                            f"architecture (one of {model_types()})")
    rest = {k: v for k, v in raw.items() if k != "model_type"}
    if hf_family(mt) is None:
        raise ChipfuseError(f"{source}: model_type {mt!r}: chipfuse has no stage split for it. "
                            f"Fix: use one of {model_types()}")
    try:
        return AutoConfig.for_model(mt, **rest)
    except Exception as e:  # transformers' own field checks raise several types; one line for all
        found = " ".join(str(e).split())
        raise ChipfuseError(f"{source}: transformers refuses this {mt} config ({found[:300]}). "
                            "Fix: correct that field (or write the config with transformers' save_pretrained)") from None


def spec_from_config_dict(raw: dict[str, Any], *, name: str, source: str) -> ModelSpec:
    """A ModelSpec (family 'hf') from a config.json's dict; refused when chipfuse cannot split it."""
    mt = raw.get("model_type")
    fam = hf_family(mt) if isinstance(mt, str) else None
    if not isinstance(mt, str) or fam is None or fam.config_fields is None:
        raise ChipfuseError(f"{source}: model_type {mt!r}: chipfuse has no stage split for this architecture "
                            f"(it splits {', '.join(model_types())}). Fix: use a config of one of these; "
                            "chipfuse does not train a look-alike of another architecture")
    c = hf_config_class_dict(raw, source)
    # transformers would fill a missing shape field with its default (a 32-layer Llama from a
    # config without num_hidden_layers): a shape is what the user means to train, so it must be there.
    aliases = getattr(c, "attribute_map", {}) or {}
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if key not in raw and aliases.get(key, key) not in raw:
            raise ChipfuseError(f"{source}: field {key!r} missing. Fix: a decoder-only config needs it "
                                "(write the config with transformers' save_pretrained)")
    _refuse_unsupported(c, mt, source)
    shape = fam.config_fields(c, source)
    return ModelSpec(name=name, family="hf", model_type=mt, hf_config=c.to_dict(),
                     num_layers=c.num_hidden_layers, dim=c.hidden_size, num_heads=c.num_attention_heads,
                     num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                     vocab_size=c.vocab_size, tie_embeddings=bool(c.tie_word_embeddings), **shape)


def config_path(path: str | Path) -> Path:
    """A config.json, or the config.json inside a Hugging Face model folder."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def from_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (or model folder) through transformers' AutoConfig; no weights.

    Refused, with the reason, when model/families/hf.py has no row for its architecture."""
    p = config_path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise ChipfuseError(f"{p}: cannot read a Hugging Face config ({e}). "
                            "Fix: give a config.json path or a model folder holding one") from None
    if not isinstance(raw, dict):
        raise ChipfuseError(f"{p}: a config.json holds one JSON object, found {type(raw).__name__}. "
                            "Fix: give a Hugging Face config.json")
    spec = spec_from_config_dict(raw, name=p.parent.name or str(raw.get("model_type", "hf")), source=str(p))
    return model_spec(spec, source=str(p), where="config (as chipfuse reads it)")  # type and range of every field


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset name, a config.json or a Hugging Face model folder."""
    if name_or_path in SPEC_PRESETS:
        return SPEC_PRESETS[name_or_path]
    p = Path(name_or_path)
    if name_or_path.endswith(".json") or p.is_file() or (p / "config.json").is_file():
        return from_hf_config(name_or_path)
    raise ChipfuseError(f"model {name_or_path!r}: not a preset nor a config.json (nor a model folder holding one). "
                        f"Fix: use one of {sorted(SPEC_PRESETS)}, a Hugging Face config.json or a folder holding one")
