"""Text to token ids: the model's own tokenizer (Hugging Face `tokenizers`, from a local
tokenizer.json) or plain UTF-8 bytes (ids 0..255, the built-in models' vocabulary)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chipfuse.errors import ChipfuseError

BYTES = "bytes"


class DataError(ChipfuseError):
    """A data file, tokenizer or data flag that cannot be used (named with the fix)."""


@dataclass(frozen=True, kw_only=True)
class Tokenizer:
    name: str
    """'bytes' or the tokenizer.json path."""
    vocab_size: int
    """Ids are < vocab_size (added tokens included)."""
    eos_id: int | None
    """Put between documents so a sample that spans two of them sees where one ends."""
    impl: Any = None

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (a Hugging Face tokenizer encodes a batch on its own threads)."""
        if self.impl is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.impl.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer(path: str | None) -> Tokenizer:
    """`None` or 'bytes': UTF-8 bytes. Otherwise a tokenizer.json, or a folder holding one (a
    Hugging Face model folder); its tokenizer_config.json, when there, names the end-of-text token."""
    if path is None or path == BYTES:
        return Tokenizer(name=BYTES, vocab_size=256, eos_id=None)
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no {file.name} there. Fix: give a tokenizer.json or a Hugging Face "
                        "model folder that holds one (or leave --tokenizer out for bytes)")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise DataError("--tokenizer needs the `tokenizers` package. Fix: pip install 'chipfuse[hf]'") from None
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # the library raises its own exception type for a malformed file
        raise DataError(f"{file}: not a tokenizers JSON file ({str(e).splitlines()[0]}). Fix: give the "
                        "tokenizer.json the model was trained with") from None
    return Tokenizer(name=str(file), vocab_size=tok.get_vocab_size(with_added_tokens=True),
                     eos_id=_eos_id(tok, file.parent / "tokenizer_config.json"), impl=tok)


def _eos_id(tok: Any, config: Path) -> int | None:
    names = []
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (OSError, json.JSONDecodeError):
            eos = None
        names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names += ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]  # the common spellings
    for n in names:
        if isinstance(n, str) and (i := tok.token_to_id(n)) is not None:
            return int(i)
    return None


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id, as nanoGPT and Megatron choose it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
