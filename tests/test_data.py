"""The user's data (chipfuse.data): formats, `chipfuse data prepare`, the sampling rule, the
held-out split, and bad input refused in one line before any step."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from chipfuse.cli import main
from chipfuse.data import DataConfig, DataError, Loader, open_loader, open_source
from chipfuse.data.prepare import prepare

TEXT = "def f(x):\n    return x + 1\n" * 40  # 1,120 bytes


def _tokenizer(tmp_path, words: int) -> str:
    """A word-level tokenizer with `words` + 2 ids, saved as tokenizer.json (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(words)}
    vocab |= {w: len(vocab) + i for i, w in enumerate(["def", "f", "(", "x", "):", "return", "+", "1"])
              if w not in vocab}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / f"tok{words}"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return str(folder)


# ------------------------------------------------------------------ formats and prepare
def test_prepare_bytes_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b.txt").write_text(TEXT)
    out = prepare(tmp_path, tmp_path / "out" / "train.bin")
    meta = json.loads((tmp_path / "out" / "train.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "bytes" and meta["documents"] == 2
    src = open_source(out["path"])
    # a folder's files in sorted order, each its UTF-8 bytes
    assert bytes(np.asarray(src.tokens, dtype=np.uint8)) == "héllo".encode() + TEXT.encode()
    assert src.kind == "tokens" and src.vocab_size == 256 and src.max_token_id() == max("héllo".encode() + b"x")


def test_prepare_with_a_hugging_face_tokenizer_and_jsonl(tmp_path):
    tok_dir = _tokenizer(tmp_path, 10)
    rows = [{"text": "def f ( x ):", "id": 1}, {"text": "return x + 1", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = prepare(tmp_path / "d.jsonl", tmp_path / "d.bin", tokenizer=tok_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    want = [i for r in rows for i in [*tok.encode(r["text"]).ids, 1]]  # each document ends in </s> (id 1)
    assert list(open_source(out["path"]).tokens) == want
    assert out["eos_id"] == 1 and out["vocab_size"] == tok.get_vocab_size()
    # the same text data tokenized at train time gives the same tokens
    assert list(open_source(str(tmp_path / "d.jsonl"), tokenizer=tok_dir).tokens) == want


def test_raw_nanogpt_and_megatron_token_files(tmp_path):
    ids = np.arange(1000) % 300
    ids.astype(np.uint16).tofile(tmp_path / "train.bin")  # nanoGPT: raw uint16, nothing beside it
    src = open_source(str(tmp_path / "train.bin"), vocab_size=50257)
    assert src.tokens.dtype == np.uint16 and list(src.tokens[:3]) == [0, 1, 2] and src.vocab_size is None
    with pytest.raises(DataError, match="sidecar"):
        open_source(str(tmp_path / "train.bin"))  # dtype unknown without the model's vocabulary
    # Megatron: .bin + .idx, whose header gives the dtype (code 4: int32)
    ids.astype(np.int32).tofile(tmp_path / "mega.bin")
    (tmp_path / "mega.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
    src = open_source(str(tmp_path / "mega.bin"), vocab_size=50257)
    assert src.tokens.dtype == np.int32 and list(src.tokens[298:302]) == [298, 299, 0, 1]


# ------------------------------------------------------------------ the sampling rule
def _loader(tmp, *, val_fraction: float = 0.0, seed: int = 3) -> Loader:
    """20,000 tokens (ids 0..250 repeating), global batch 8, sequences of 16."""
    path = tmp / "t.bin"
    (np.arange(20_000) % 251).astype(np.uint16).tofile(path)
    return open_loader(DataConfig(path=str(path), val_fraction=val_fraction), global_batch=8, seq_len=16,
                       vocab_size=256, seed=seed)


def test_samples_fixed_by_seed_step_and_index_whatever_the_shares(tmp_path):
    loader = _loader(tmp_path)
    for step in (0, 5, 400):
        whole, _ = loader.batch(step)
        for shares in ([3, 2, 2, 1], [5, 3], [1] * 8):
            offsets = np.cumsum([0, *shares[:-1]])
            parts = torch.cat([loader.batch(step, int(o), s)[0] for o, s in zip(offsets, shares, strict=True)])
            assert torch.equal(parts, whole)
    # a fresh loader (a resumed or re-planned run) draws the same samples
    assert torch.equal(_loader(tmp_path).batch(7, 2, 3)[0], loader.batch(7, 2, 3)[0])
    assert not torch.equal(_loader(tmp_path, seed=4).batch(7)[0], loader.batch(7)[0])


def test_every_window_once_per_epoch(tmp_path):
    loader = _loader(tmp_path)
    W = loader.sampler.describe()["num_windows"]
    assert W == (20_000 - 1) // 16
    steps = -(-W // 8) + 3  # a little past the first epoch
    starts = np.concatenate([loader.sampler.starts(s, 8, 0, 8) for s in range(steps)])
    first = starts[:W]
    assert sorted(first.tolist()) == [k * 16 for k in range(W)]  # each window exactly once
    x, y = loader.batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def test_validation_split_is_held_out_and_tiled_by_any_shares(tmp_path):
    loader = _loader(tmp_path, val_fraction=0.1)
    assert loader.num_train_tokens == 18_000 and loader.num_eval_samples == 8
    assert int(loader.sampler.starts(0, 8, 0, 8).max()) + 16 < 18_000  # training never reads the tail
    xs, _ = loader.val_batch(0, 8)
    assert int(xs[0, 0]) == 18_000 % 251
    for shares in ([5, 2, 1], [8], [3, 3, 2]):
        offsets = np.cumsum([0, *shares[:-1]])
        tiles = [loader.val_share(int(o), s) for o, s in zip(offsets, shares, strict=True)]
        assert sum(c for _, c in tiles) == 8 and all(a + c == b for (a, c), (b, _) in zip(tiles, tiles[1:], strict=False))


# ------------------------------------------------------------------ bad input: one line, before any step
def _refused(tmp_path, capsys, *flags: str) -> str:
    run = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--global-batch", "4", "--steps", "2", "--solo-samples", "0",
               "--run-dir", str(run), "--dry-run", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err and "Fix:" in err, err
    assert not run.exists()  # refused before the plan was even written
    return err


def test_tokenizer_larger_than_the_models_vocabulary(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "t.txt"), "--tokenizer", _tokenizer(tmp_path, 300))
    assert "t.txt" in err and "310 ids" in err and "vocab_size 256" in err


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: no tokens" in _refused(tmp_path, capsys, "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "empty.bin").write_bytes(b"")
    assert "empty.bin: no tokens" in _refused(tmp_path, capsys, "--data", str(tmp_path / "empty.bin"))
    with pytest.raises(DataError, match="no text"):
        prepare(tmp_path / "empty.txt", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.tmp").exists()


def test_data_shorter_than_one_sequence(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("x" * 20)  # tiny's sequence: 32 tokens
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "short.txt"))
    assert "short.txt: 20 tokens, shorter than one sequence (32 + 1" in err and "--seq-len" in err
    (tmp_path / "ok.txt").write_text("x" * 100)
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "ok.txt"), "--val-fraction", "0.1")
    assert "--val-fraction 0.1 holds out 10 tokens" in err


def test_jsonl_without_the_text_field(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"content": "x"}) + "\n")
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "d.jsonl"))
    assert "d.jsonl line 2: no field 'text' (found ['content'])" in err and "--text-field" in err


def test_token_ids_outside_the_vocabulary(tmp_path, capsys):
    np.concatenate([np.arange(100), [300]]).astype(np.uint16).tofile(tmp_path / "ids.bin")  # tiny: vocab 256
    err = _refused(tmp_path, capsys, "--data", str(tmp_path / "ids.bin"))
    assert "ids.bin: token id 300 is outside the model's vocab_size 256" in err


def test_eval_without_a_split_and_a_bad_recipe(tmp_path, capsys):
    assert "--val-fraction" in _refused(tmp_path, capsys, "--eval-every", "5")
    assert "--grad-clip -1.0" in _refused(tmp_path, capsys, "--grad-clip", "-1")
