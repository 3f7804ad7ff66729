"""`chipfuse data prepare`: tokenize text once into a memory-mapped token file.

The output is a raw array of uint16 ids (uint32 when the vocabulary needs it), the layout nanoGPT
and Megatron's `.bin` use, plus a sidecar `FILE.json` that says its dtype, the tokenizer and its
vocabulary size, the number of tokens and the largest id (so training checks them without a
scan). Written to `FILE.tmp` and renamed when complete: a failed run leaves no half file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from chipfuse.data.sources import SIDECAR_FORMAT, encode_documents, iter_documents, sidecar_path
from chipfuse.data.tokenize import DataError, load_tokenizer, token_dtype


def prepare(input_path: str | Path, out: str | Path, *, tokenizer: str | None = None,
            text_field: str = "text") -> dict[str, Any]:
    """Tokenize every document under `input_path` into `out`; returns the sidecar's contents."""
    out = Path(out)
    if out.suffix != ".bin":
        raise DataError(f"--out {out}: token files end in .bin (how `--data` recognises them). Fix: --out "
                        f"{out.with_suffix('.bin')}")
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    documents = iter_documents(input_path, text_field=text_field)  # lists the input before writing beside it
    tmp = out.with_name(out.name + ".tmp")
    num_tokens, max_id, docs = 0, 0, 0
    try:
        with tmp.open("wb") as f:
            for ids in encode_documents(documents, tok):
                docs += 1
                if ids.size:
                    max_id = max(max_id, int(ids.max()))
                    f.write(ids.astype(dtype).tobytes())
                    num_tokens += int(ids.size)
            f.flush()
            os.fsync(f.fileno())
        if num_tokens == 0:
            raise DataError(f"{input_path}: no text in it ({docs} documents, 0 tokens). Fix: give a file or folder "
                            "with text")
        meta = {"format": SIDECAR_FORMAT, "version": 1, "dtype": dtype.name, "num_tokens": num_tokens,
                "max_token_id": max_id, "vocab_size": tok.vocab_size, "tokenizer": tok.name, "eos_id": tok.eos_id,
                "documents": docs, "source": str(input_path), "text_field": text_field}
        sidecar_path(out).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**meta, "path": str(out), "bytes": num_tokens * np.dtype(dtype).itemsize,
            "seconds": time.perf_counter() - t0}
