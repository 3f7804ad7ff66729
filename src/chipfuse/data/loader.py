"""Batches for the training loop: a token source, a sampler, and a held-out split.

The loop asks `loader.batch(step, start, count)` for samples start .. start+count-1 of a global
step (a replica's share) and, every N steps, `loader.val_batch(...)` for its part of the fixed
validation set. `get_batch` / `batch_indices` / `corpus` are the built-in corpus's first API,
kept with their behaviour.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from chipfuse.data.sampler import EpochWindows, RandomOffsets, Sampler
from chipfuse.data.sources import TokenSource, builtin_source, open_source
from chipfuse.data.tokenize import DataError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str | None = None
    """A text file or folder, a JSON-lines file, or a token file (.bin); None = the built-in corpus."""
    tokenizer: str | None = None
    """For text data: a tokenizer.json or a Hugging Face model folder; None = bytes."""
    text_field: str = "text"
    """The JSON-lines field that holds the text."""
    val_fraction: float = 0.0
    """The tail of the tokens held out for validation (0 = none)."""
    eval_every: int = 0
    """Validation loss and perplexity every N steps (and after the last); 0 = never."""
    eval_samples: int = 0
    """Validation samples per evaluation; 0 = one global batch (fewer if the split is smaller)."""

    def to_dict(self) -> dict:
        return asdict(self)


class Loader:
    """Samples of any global step, and the validation set, from one source."""

    def __init__(self, source: TokenSource, *, global_batch: int, seq_len: int, seed: int = 0,
                 val_fraction: float = 0.0, eval_samples: int = 0):
        self.source, self.global_batch, self.seq_len, self.seed = source, global_batch, seq_len, seed
        self.val_fraction = val_fraction
        n = len(source)
        n_val = round(n * val_fraction) if val_fraction > 0 else 0
        self.num_train_tokens = n - n_val
        self.num_val_tokens = n_val
        # Both splits hold whole windows of seq_len + 1 tokens (inputs and their next-token targets).
        self.num_val_windows = max(0, (n_val - 1) // seq_len) if n_val else 0
        self.sampler: Sampler
        if source.kind == "builtin":
            self.sampler = RandomOffsets(num_starts=self.num_train_tokens - seq_len - 1, seed=seed)
        else:
            self.sampler = EpochWindows(num_windows=max(1, (self.num_train_tokens - 1) // seq_len), seq_len=seq_len,
                                        seed=seed)
        self.num_eval_samples = min(eval_samples or global_batch, self.num_val_windows)
        self._span = np.arange(seq_len + 1, dtype=np.int64)

    def _read(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(np.asarray(self.source.tokens[starts[:, None] + self._span[None, :]],
                                            dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step: int, start: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, start+count) of global step `step`: inputs and targets, (count, seq_len) int64."""
        n = self.global_batch - start if count is None else count
        return self._read(self.sampler.starts(step, self.global_batch, start, n))

    def val_share(self, offset: int, share: int) -> tuple[int, int]:
        """The validation samples of the replica at `offset` with `share` samples of each global
        batch: the same fraction of the validation set, so the replicas tile it exactly."""
        a = offset * self.num_eval_samples // self.global_batch
        b = (offset + share) * self.num_eval_samples // self.global_batch
        return a, b - a

    def val_batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation samples [start, start+count): fixed windows of the held-out tail, in order."""
        k = np.arange(start, start + count, dtype=np.int64)
        return self._read(self.num_train_tokens + k * self.seq_len)

    def position(self, step: int) -> dict[str, Any]:
        """Where training stands in the data (what a checkpoint records): the next step to train."""
        out = {"source": self.source.describe(), "step": step, "seed": self.seed, "global_batch": self.global_batch,
               "seq_len": self.seq_len, "val_fraction": self.val_fraction, "sampler": self.sampler.describe()}
        if isinstance(self.sampler, EpochWindows):
            out["epoch"] = self.sampler.epoch_of(step, self.global_batch)
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "train_tokens": self.num_train_tokens, "val_tokens": self.num_val_tokens,
                "val_samples": self.num_eval_samples, "sampler": self.sampler.describe()}


def open_loader(cfg: DataConfig, *, global_batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> Loader:
    """The loader for a run, or DataError before any step: a vocabulary or ids the model cannot take,
    too little data for one sequence, a validation split too small to hold one."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction {cfg.val_fraction}: not in [0, 1). Fix: e.g. --val-fraction 0.05")
    if cfg.eval_every < 0:
        raise DataError(f"--eval-every {cfg.eval_every}: negative. Fix: 0 (never) or a number of steps")
    if cfg.eval_every and not cfg.val_fraction:
        raise DataError("--eval-every needs a held-out split. Fix: add --val-fraction (e.g. 0.05)")
    src = open_source(cfg.path, tokenizer=cfg.tokenizer, text_field=cfg.text_field, vocab_size=vocab_size)
    name = src.path
    if len(src) == 0:
        raise DataError(f"{name}: no tokens (an empty data file). Fix: give a file with text in it")
    if src.vocab_size is not None and src.vocab_size > vocab_size:
        raise DataError(f"{name}: tokenizer {src.tokenizer} has {src.vocab_size} ids, more than the model's vocab_size "
                        f"{vocab_size}. Fix: tokenize with the model's own tokenizer, or use a model config whose "
                        f"vocab_size is at least {src.vocab_size}")
    top = src.max_token_id()
    if top >= vocab_size:
        raise DataError(f"{name}: token id {top} is outside the model's vocab_size {vocab_size}. Fix: tokenize with the "
                        "model's own tokenizer (`chipfuse data prepare --tokenizer`), or use a model with a larger "
                        "vocabulary")
    loader = Loader(src, global_batch=global_batch, seq_len=seq_len, seed=seed, val_fraction=cfg.val_fraction,
                    eval_samples=cfg.eval_samples)
    if loader.num_train_tokens < seq_len + 2:
        what = f"{len(src)} tokens" + (f", {loader.num_train_tokens} after the validation split" if cfg.val_fraction
                                       else "")
        raise DataError(f"{name}: {what}, shorter than one sequence ({seq_len} + 1 tokens). Fix: give more data, "
                        "or lower --seq-len" + (" or --val-fraction" if cfg.val_fraction else ""))
    if cfg.val_fraction and loader.num_val_windows < 1:
        need = math.ceil((seq_len + 1) / len(src) * 1000) / 1000
        raise DataError(f"{name}: --val-fraction {cfg.val_fraction} holds out {loader.num_val_tokens} tokens, shorter "
                        f"than one sequence ({seq_len} + 1). Fix: raise --val-fraction to at least {need}, or give more data")
    return loader


def check_same_source(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> None:
    """A checkpoint's data position (`saved`) must be on the data of this run's position `now`
    (Loader.position): resuming on other tokens, split or seed would not continue the same training."""
    if not saved:
        return
    if saved.get("source", {}).get("fingerprint") != now["source"]["fingerprint"]:
        raise DataError(f"{where}: written while training on {saved.get('source', {}).get('path')} (fingerprint "
                        f"{saved.get('source', {}).get('fingerprint')}), but --data gives {now['source']['path']} "
                        f"(fingerprint {now['source']['fingerprint']}). Fix: resume with the same --data, or start "
                        "a new run without --resume")
    for key in ("seed", "val_fraction"):
        if key in saved and saved[key] != now[key]:
            raise DataError(f"{where}: written with data {key}={saved[key]!r}, this run has {now[key]!r}. Fix: "
                            f"resume with the same {key}, or start a new run without --resume")


# ------------------------------------------------------------------ the first API (built-in corpus)
def corpus(max_bytes: int = 8 << 20) -> torch.Tensor:
    """Up to `max_bytes` of stdlib .py sources, in a fixed order, as a uint8 tensor."""
    return torch.from_numpy(builtin_source(max_bytes).tokens.copy())


@functools.cache
def builtin_loader(global_batch: int, seq_len: int, seed: int = 0) -> Loader:
    return Loader(builtin_source(), global_batch=global_batch, seq_len=seq_len, seed=seed)


def batch_indices(step: int, global_batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Start offsets of the `global_batch` samples of global step `step` (built-in corpus)."""
    sampler = builtin_loader(global_batch, seq_len, seed).sampler
    assert isinstance(sampler, RandomOffsets)
    return sampler.all_starts(step, global_batch)


def get_batch(step: int, global_batch: int, seq_len: int, start: int = 0, count: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [start, start+count) of global step `step`: inputs and targets, (count, seq_len) int64."""
    return builtin_loader(global_batch, seq_len, seed).batch(step, start, count)
