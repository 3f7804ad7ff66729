"""Where training tokens come from, as one flat array of token ids:

- the built-in corpus (the Python standard library's own sources, as bytes): the default;
- plain-text files, or a folder of them (each file one document);
- JSON lines with a text field (each line one document; the field name is configurable);
- pre-tokenized token files: a raw memory-mapped array of uint16 or uint32 ids, as nanoGPT's
  `prepare.py` and Megatron's `preprocess_data.py` write them (`.bin`). Its dtype is read from
  the sidecar `FILE.json` that `chipfuse data prepare` writes, else from a Megatron `.idx` beside
  it, else from the model's vocabulary size (uint16 when it holds every id, as both tools do).

Text is tokenized when opened (in memory); for large corpora run `chipfuse data prepare` once
and train on its token file, which is memory-mapped, never read whole.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import struct
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from chipfuse.data.tokenize import DataError, Tokenizer, load_tokenizer, token_dtype

SIDECAR_FORMAT = "chipfuse-tokens"
TOKEN_SUFFIXES = (".bin",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Megatron's indexed-dataset header and its dtype codes (megatron/core/datasets/indexed_dataset.py).
_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}

Kind = Literal["builtin", "text", "jsonl", "tokens"]


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: hashed by identity (it holds an array)
class TokenSource:
    """A flat array of token ids and what is known about it."""

    kind: Kind
    path: str
    """The file or folder ('builtin' for the built-in corpus)."""
    tokens: np.ndarray = field(repr=False)
    """1-D; a read-only np.memmap for token files."""
    vocab_size: int | None
    """The vocabulary of the tokenizer that wrote it (None: unknown, a raw token file)."""
    tokenizer: str
    fingerprint: str
    """Identifies the tokens: a checkpoint written on one source refuses to resume on another."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def max_token_id(self) -> int:
        """The largest id in the source (read from the sidecar when `prepare` wrote one)."""
        return _max_id(self)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "num_tokens": len(self), "vocab_size": self.vocab_size,
                "tokenizer": self.tokenizer, "fingerprint": self.fingerprint}


@functools.cache
def _max_id(src: TokenSource) -> int:
    side = sidecar_path(Path(src.path))
    if src.kind == "tokens" and side.is_file():
        meta = json.loads(side.read_text())
        if "max_token_id" in meta:
            return int(meta["max_token_id"])
    out = 0
    for i in range(0, len(src), 1 << 24):  # in chunks: a memory map is never read whole at once
        out = max(out, int(src.tokens[i: i + (1 << 24)].max(initial=0)))
    return out


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


# ---------------------------------------------------------------------------------------- built-in
@functools.cache
def builtin_source(max_bytes: int = 8 << 20) -> TokenSource:
    """Up to `max_bytes` of stdlib .py sources, in a fixed order, as bytes (vocabulary 256)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if total < 1 << 16:
        # Some minimal Pythons ship no sources: fall back to generated text with structure.
        import torch

        g = torch.Generator().manual_seed(0)
        words = [bytes(f"def f{i}(x):\n    return x * {i}\n", "ascii") for i in range(1000)]
        order = torch.randint(0, len(words), (20000,), generator=g).tolist()
        chunks = [words[i] for i in order]
    data = b"".join(chunks)[:max_bytes]
    tokens = np.frombuffer(data, dtype=np.uint8)
    return TokenSource(kind="builtin", path="builtin", tokens=tokens, vocab_size=256, tokenizer="bytes",
                       fingerprint="builtin:" + hashlib.sha256(data).hexdigest()[:16])


# ---------------------------------------------------------------------------------------- text
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(path).parts))
    return [path]


def iter_documents(path: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """Every document under `path`: a text file is one, a JSON-lines file one per line. The files are
    listed now (so an output written under `path` later is not read back as input)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder. Fix: give a text file, a folder, a .jsonl or a .bin file")
    files = _files(p)
    for f in files:
        if f.suffix in TOKEN_SUFFIXES or f.name.endswith(".bin.json") or f.suffix == ".idx":
            raise DataError(f"{f}: a token file inside a text folder. Fix: give the token file itself to --data, "
                            "or keep only text under the folder")
    return _documents(files, text_field)


def _documents(files: list[Path], text_field: str) -> Iterator[str]:
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(f, text_field)
        else:
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start}). Fix: convert it to UTF-8, or pass a token "
                                "file (.bin)") from None


def _jsonl_documents(f: Path, text_field: str) -> Iterator[str]:
    with f.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f} line {n}: not JSON ({e.msg}). Fix: one JSON object per line") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{f} line {n}: no field {text_field!r} (found {fields}). Fix: pass "
                                "--text-field NAME with the field that holds the text")
            text = row[text_field]
            if not isinstance(text, str):
                raise DataError(f"{f} line {n}: field {text_field!r} is a {type(text).__name__}, not a string. "
                                "Fix: point --text-field at the text")
            yield text


def encode_documents(docs: Iterator[str], tok: Tokenizer, batch: int = 256) -> Iterator[np.ndarray]:
    """Token ids of each document, followed by the end-of-text id when the tokenizer has one."""
    eos = np.asarray([tok.eos_id], dtype=np.int64) if tok.eos_id is not None else None
    pending: list[str] = []
    for d in itertools.chain(docs, [None]):  # None: flush the last batch (streaming, never all at once)
        if d is not None:
            pending.append(d)
        if pending and (d is None or len(pending) == batch):
            for ids in tok.encode_batch(pending):
                yield np.concatenate([ids, eos]) if eos is not None else ids
            pending = []


# ---------------------------------------------------------------------------------------- opening
def open_source(path: str | None, *, tokenizer: str | None = None, text_field: str = "text",
                vocab_size: int | None = None) -> TokenSource:
    """The tokens at `path` (None: the built-in corpus). `vocab_size`: the model's, which chooses the
    dtype of a token file that says nothing of its own."""
    if path is None or path == "builtin":
        return builtin_source()
    p = Path(path)
    if p.is_file() and p.suffix in TOKEN_SUFFIXES:
        if tokenizer is not None:
            raise DataError(f"--data {p} is already tokenized and --tokenizer {tokenizer} was given. Fix: leave "
                            "--tokenizer out (it applies to text data)")
        return _token_file(p, vocab_size)
    tok = load_tokenizer(tokenizer)
    kind: Kind = "jsonl" if p.is_file() and p.suffix in JSONL_SUFFIXES else "text"
    parts = list(encode_documents(iter_documents(p, text_field=text_field), tok))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    tokens = tokens.astype(token_dtype(tok.vocab_size))
    h = hashlib.sha256(tokens.tobytes())
    return TokenSource(kind=kind, path=str(p), tokens=tokens, vocab_size=tok.vocab_size, tokenizer=tok.name,
                       fingerprint=f"{kind}:{h.hexdigest()[:16]}")


def _token_file(p: Path, vocab_size: int | None) -> TokenSource:
    side = sidecar_path(p)
    idx = p.with_suffix(".idx")
    source_vocab: int | None = None
    tokenizer = "unknown"
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            dtype = np.dtype(meta["dtype"])
            source_vocab = int(meta["vocab_size"])
            tokenizer = str(meta.get("tokenizer", "unknown"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{side}: unreadable sidecar ({e!r}). Fix: write it again with `chipfuse data prepare`, "
                            "or delete it to take the dtype from the model's vocabulary") from None
        how = f"sidecar {side.name}"
    elif idx.is_file() and idx.read_bytes()[:9] == _MEGATRON_MAGIC:
        code = struct.unpack("<B", idx.read_bytes()[17:18])[0]
        if code not in _MEGATRON_DTYPES:
            raise DataError(f"{idx}: Megatron dtype code {code} is not an integer token type. Fix: tokenize again")
        dtype = np.dtype(_MEGATRON_DTYPES[code])
        how = f"Megatron index {idx.name}"
    else:
        if vocab_size is None:
            raise DataError(f"{p}: a raw token file without {side.name}: its dtype follows the model's vocabulary, "
                            "which is unknown here. Fix: write the sidecar with `chipfuse data prepare`")
        dtype = token_dtype(vocab_size)
        how = f"the model's vocab_size {vocab_size}"
    size = p.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{p}: {size} bytes is not a whole number of {dtype} tokens (dtype from {how}). Fix: give the "
                        "file's real dtype in its sidecar, or tokenize again with `chipfuse data prepare`")
    tokens = np.memmap(p, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    return TokenSource(kind="tokens", path=str(p), tokens=tokens,
                       vocab_size=source_vocab,
                       tokenizer=tokenizer, fingerprint=f"tokens:{_file_fingerprint(p, dtype)}")


def _file_fingerprint(p: Path, dtype: np.dtype, sample_bytes: int = 1 << 20) -> str:
    """Size, dtype and three 1 MiB samples (start, middle, end): cheap at every start, and it
    changes with any re-tokenization or a different file."""
    size = p.stat().st_size
    h = hashlib.sha256(f"{size}:{dtype.str}".encode())
    with p.open("rb") as f:
        for at in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
            f.seek(at)
            h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]
