"""The shape of a decoder-only transformer, as the planner and the runtime both see it.

Pure (no torch): the planner prices a ModelSpec, the runtime builds it. `family` names its row in
model/registry.py; the built-in ones:

- ``gpt``: chipfuse's built-in GPT (model/gpt.py): LayerNorm, GELU MLP, learned positions, biases.
- ``llama``: a Llama shape given by its numbers alone (the presets), built as transformers'
  LlamaForCausalLM.
- ``hf``: any architecture of model/families/hf.py's rows, read from a Hugging Face config.json
  through transformers' AutoConfig (model/configs.py); ``hf_config`` keeps the whole config so that
  every rank builds exactly that model, and the shape fields below are read from it so that the
  planner's parameter count equals transformers' (tests/test_hf_arch.py checks it per architecture).

The architecture fields (`norm` ... `final_norm`) are optional overrides: None means the family's
default (Family.arch_defaults), so a hand-written plan for the built-in GPT or a Llama preset stays
short. `arch()` resolves them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from chipfuse.model.registry import family_of


@dataclass(frozen=True, kw_only=True)
class Arch:
    """The resolved architecture of a spec: what parameter counts and FLOPs depend on."""

    norm: Literal["layernorm", "rmsnorm"]
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    gated_mlp: bool
    """Three MLP matrices (gate, up, down; SwiGLU/GeGLU) instead of two."""
    position_rows: int
    """Rows of a learned position table (0: rotary positions, no parameters)."""
    head_dim: int
    qk_norm: bool
    """A norm over head_dim on queries and on keys (Qwen3, Gemma 3)."""
    norms_per_block: int
    embed_dim: int
    """Width of the token embedding; != dim means project_in / project_out matrices (OPT)."""
    final_norm: bool

    @property
    def norm_params(self) -> int:
        """Parameters of one norm per unit of width (LayerNorm: weight and bias; RMSNorm: weight)."""
        return 2 if self.norm == "layernorm" else 1


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    family: str = "gpt"
    """Its family in model/registry.py: 'gpt' (built-in), 'llama' (a Llama shape from these numbers), 'hf'
    (model_type + hf_config), or one a test registered."""
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int | None = None
    """None = num_heads (no grouped-query attention)."""
    ffn_dim: int | None = None
    """None = the family's rule (Family.default_ffn: 4 * dim for gpt, the Llama rule for the others)."""
    vocab_size: int
    seq_len: int
    """The longest context the model is built for (positions)."""
    tie_embeddings: bool = False
    model_type: str | None = None
    """Hugging Face model_type (family 'hf'): 'qwen2', 'gpt2', 'opt', ..."""
    hf_config: dict[str, Any] | None = field(default=None, hash=False)
    """The whole Hugging Face config (family 'hf'), as transformers' `to_dict()` writes it."""
    norm: str | None = None
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    gated_mlp: bool | None = None
    position_rows: int | None = None
    head_dim: int | None = None
    qk_norm: bool | None = None
    norms_per_block: int | None = None
    embed_dim: int | None = None
    final_norm: bool | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_dim or family_of(self).default_ffn(self.dim)

    def arch(self) -> Arch:
        return self._arch

    @cached_property
    def memo(self) -> dict[Any, Any]:
        """Tables that pure functions derive from this spec once and read many times (plan.memory's
        per-layer activation bytes), keyed by the function's own key; a spec is frozen, so they never
        go stale."""
        return {}

    @cached_property
    def _arch(self) -> Arch:
        """Computed once per spec (the planner asks for it millions of times in a 1024-device search);
        cached_property writes the instance's __dict__, which a frozen dataclass allows."""
        defaults = {"head_dim": self.dim // self.num_heads, "qk_norm": False, "norms_per_block": 2,
                    "embed_dim": self.dim, "final_norm": True, **family_of(self).arch_defaults(self)}
        return Arch(**{k: defaults[k] if getattr(self, k) is None else getattr(self, k)
                       for k in Arch.__dataclass_fields__})

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
