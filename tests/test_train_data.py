"""`chipfuse train --data` end to end: a prepared token file, validation every N steps, the recipe;
a run stopped, then resumed re-planned over fewer devices, follows the uninterrupted run's loss
curve (the same samples at the same steps); resuming on other data is refused before start."""

from __future__ import annotations

import json

import pytest
import torch

from chipfuse.cli import main
from chipfuse.data import corpus
from chipfuse.runtime.endure import checkpoint
from tests.pipeline_helpers import TINY_GPT, plan_of

POOL = """
name = "two"
[[node]]
name = "host"
[[node.device]]
name = "a"
chip = "A100"
emulate = { speed = 0.5 }
[[node.device]]
name = "b"
chip = "A100"
emulate = { speed = 0.5 }
"""
RECIPE = ["--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", "2", "--decay-steps", "6",
          "--grad-clip", "0.5", "--weight-decay", "0.1", "--val-fraction", "0.1", "--eval-every", "3"]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_stop_then_resume_on_fewer_devices_follows_the_uninterrupted_curve(tmp_path, capsys):
    (tmp_path / "pool.toml").write_text(POOL)
    (tmp_path / "text.txt").write_bytes(bytes(corpus()[:60_000].tolist()))
    data = str(tmp_path / "train.bin")
    assert main(["data", "prepare", str(tmp_path / "text.txt"), "--out", data, "--json", str(tmp_path / "p.json")]) == 0
    common = ["--pool", str(tmp_path / "pool.toml"), "--data", data, "--solo-samples", "0", "--no-progress", *RECIPE]

    # Uninterrupted: one device, 6 steps.
    assert main(["train", "--exclude", "b", "--model", "tiny", "--global-batch", "8", "--steps", "6",
                 "--run-dir", str(tmp_path / "whole"), "--json", str(tmp_path / "whole.json"), *common]) == 0
    whole = _rows(tmp_path / "whole" / "metrics.jsonl")
    summary = json.loads((tmp_path / "whole.json").read_text())
    assert summary["recipe"]["grad_clip"] == 0.5 and summary["recipe"]["schedule"] == "cosine"
    assert summary["data"]["kind"] == "tokens" and summary["data"]["val_tokens"] == 6000
    assert [r["step"] for r in whole if "val_loss" in r] == [2, 5]
    assert summary["final_val_loss"] == whole[5]["val_loss"] and summary["final_val_ppl"] > 1
    assert [r["lr"] for r in whole[:2]] == [1.5e-3, 3e-3] and whole[5]["lr"] < whole[2]["lr"]
    assert all(r["grad_norm"] > 0 for r in whole)

    # Interrupted: a two-stage pipeline over a and b stops after 3 steps with a checkpoint...
    plan = tmp_path / "plan.json"
    plan_of(TINY_GPT, [([("a", 2), ("b", 1)], 8, 2)]).to_json(plan)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    assert main(["train", "--plan", str(plan), "--steps", "3", "--checkpoint-dir", str(ckpt), "--run-dir", str(run),
                 *common]) == 0
    manifest = json.loads((ckpt / "step_000003" / checkpoint.MANIFEST).read_text())
    pos = manifest["extra"]["data"]
    assert pos["step"] == 3 and pos["source"]["path"] == data and pos["sampler"]["rule"] == "epoch-windows"

    # ...and resumes re-planned over one device (b is gone).
    assert main(["train", "--resume", str(ckpt), "--exclude", "b", "--steps", "6", "--run-dir", str(run),
                 *common]) == 0
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))  # nothing trained twice, nothing skipped
    # The same samples at every step, split differently (a pipeline of micro-batches of 2, then one
    # device): float32 rounding only. Adam's first steps are nearly sign(grad), so an entry near zero
    # can flip with rounding and move a weight by 2 x lr: 1e-3 relative (as test_train_endure).
    torch.testing.assert_close([r["loss"] for r in rows], [r["loss"] for r in whole], rtol=1e-3, atol=1e-4)
    # Validation loss of the pipeline (forward only, through its schedule) = one device's, same weights.
    torch.testing.assert_close([r["val_loss"] for r in rows if "val_loss" in r],
                               [r["val_loss"] for r in whole if "val_loss" in r], rtol=1e-3, atol=1e-4)

    # Other data: refused before any worker starts, in one line.
    (tmp_path / "other.txt").write_bytes(bytes(corpus()[60_000:120_000].tolist()))
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpt), "--steps", "8", "--run-dir", str(tmp_path / "r3"),
                 *[a if a != data else str(tmp_path / "other.txt") for a in common]]) == 2
    err = capsys.readouterr().err.strip()
    assert "step_000006: written while training on " + data in err and "Fix: resume with the same --data" in err
    assert "\n" not in err
