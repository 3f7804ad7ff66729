"""The shape of a decoder-only transformer, as the planner and the runtime both see it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from chipfuse.errors import ChipfuseError


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """GPT (LayerNorm, GELU MLP, learned positions) or Llama (RMSNorm, SwiGLU, RoPE, GQA) shape."""

    name: str
    family: str = "gpt"
    """'gpt' or 'llama'."""
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int | None = None
    """None = num_heads (no grouped-query attention)."""
    ffn_dim: int | None = None
    """None = 4 * dim (gpt) or the Llama rule."""
    vocab_size: int
    seq_len: int
    """The longest context the model is built for (positions)."""
    tie_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        if self.family == "llama":
            h = int(2 * 4 * self.dim / 3)
            return 256 * ((h + 255) // 256)
        return 4 * self.dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**d)


def _llama(name: str, layers: int, dim: int, heads: int, kv: int, ffn: int, vocab: int = 32000,
           seq: int = 4096) -> ModelSpec:
    return ModelSpec(name=name, family="llama", num_layers=layers, dim=dim, num_heads=heads,
                     num_kv_heads=kv, ffn_dim=ffn, vocab_size=vocab, seq_len=seq)


SPEC_PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(name="tiny", num_layers=3, dim=64, num_heads=4, vocab_size=256, seq_len=32),
    "small": ModelSpec(name="small", num_layers=4, dim=128, num_heads=4, vocab_size=256, seq_len=128),
    "medium": ModelSpec(name="medium", num_layers=6, dim=384, num_heads=6, vocab_size=256, seq_len=128),
    "gpt2": ModelSpec(name="gpt2", num_layers=12, dim=768, num_heads=12, vocab_size=50257, seq_len=1024,
                      tie_embeddings=True),
    "gpt2-xl": ModelSpec(name="gpt2-xl", num_layers=48, dim=1600, num_heads=25, vocab_size=50257,
                         seq_len=1024, tie_embeddings=True),
    "llama-1b": _llama("llama-1b", 16, 2048, 32, 8, 8192, vocab=128256),
    "llama-7b": _llama("llama-7b", 32, 4096, 32, 32, 11008),
    "llama-13b": _llama("llama-13b", 40, 5120, 40, 40, 13824),
    "llama-70b": _llama("llama-70b", 80, 8192, 64, 8, 28672, vocab=128256),
}


def from_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (Llama-, Mistral-, Qwen- or GPT-2-style); no weights."""
    p = Path(path)
    try:
        c = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise ChipfuseError(f"{p}: cannot read a Hugging Face config ({e}). Fix: give a config.json path") from None
    if not isinstance(c, dict):
        raise ChipfuseError(f"{p}: found {type(c).__name__}, not a JSON object. Fix: give a config.json path")
    mt = c.get("model_type", "")
    try:
        if mt == "gpt2" or "n_embd" in c:
            spec = ModelSpec(name=p.parent.name or mt, family="gpt", num_layers=c["n_layer"], dim=c["n_embd"],
                             num_heads=c["n_head"], vocab_size=c["vocab_size"],
                             seq_len=c.get("n_positions", 1024), ffn_dim=c.get("n_inner"),
                             tie_embeddings=c.get("tie_word_embeddings", True))
        else:
            spec = ModelSpec(name=p.parent.name or mt or "hf", family="llama", num_layers=c["num_hidden_layers"],
                             dim=c["hidden_size"], num_heads=c["num_attention_heads"],
                             num_kv_heads=c.get("num_key_value_heads"), ffn_dim=c["intermediate_size"],
                             vocab_size=c["vocab_size"], seq_len=c.get("max_position_embeddings", 4096),
                             tie_embeddings=c.get("tie_word_embeddings", False))
    except KeyError as e:
        raise ChipfuseError(f"{p}: field {e} missing. Fix: a decoder-only config needs it") from None
    from chipfuse.validate import model_spec

    return model_spec(spec, source=str(p), where="config (as chipfuse reads it)")  # type and range of every field


def resolve_model(name_or_path: str) -> ModelSpec:
    if name_or_path in SPEC_PRESETS:
        return SPEC_PRESETS[name_or_path]
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        return from_hf_config(name_or_path)
    raise ChipfuseError(f"model {name_or_path!r}: not a preset nor a config.json. "
                        f"Fix: use one of {sorted(SPEC_PRESETS)} or a path to a Hugging Face config.json")
