"""The public command-line flags, frozen: a rename or removal breaks users' scripts, so it must be
a deliberate change to this list (as torchtitan freezes its config flags)."""

import argparse

from chipfuse.cli import build_parser

FROZEN = {
    "pool show": ["--json"],
    "pool detect": ["--bench", "--json"],
    "pool catalog": ["--json"],
    "pool rehearse": ["--dtype", "--json", "--max-devices", "--model", "--out"],
    "train": ["--checkpoint-dir", "--checkpoint-every", "--checkpoint-keep", "--data", "--decay-steps", "--dry-run",
              "--eval-every", "--eval-samples", "--even", "--exclude", "--freeze", "--global-batch", "--grad-clip", "--init-from", "--json",
              "--lr", "--lr-schedule", "--metrics", "--micro-batch", "--min-lr", "--model", "--nan-policy",
              "--no-progress", "--no-rebalance", "--on-device-loss", "--plan", "--pool", "--pool-node", "--profile",
              "--resume", "--run-dir", "--seed", "--seq-len", "--shares", "--slowdown", "--solo-samples", "--steps",
              "--text-field", "--timeline", "--tokenizer", "--unit-s", "--val-fraction", "--warmup-steps",
              "--weight-decay"],
    "plan": ["--concurrency", "--context-len", "--dtype", "--evaluate", "--freeze", "--global-batch", "--json", "--max-model",
             "--micro-batch", "--model", "--optimizer-dtype", "--pool", "--profile", "--quantize",
             "--schedule", "--seq-len", "--serve", "--sync", "--time-budget", "--timeline"],
    "data prepare": ["--json", "--out", "--text-field", "--tokenizer"],
    "export": ["--json", "--out", "--tokenizer"],
    "profile": ["--json", "--micro-batch", "--model", "--no-links", "--pool", "--seq-len", "--slack"],
    "generate": ["--concurrency", "--context-len", "--dtype", "--json", "--max-new-tokens", "--model", "--pool",
                 "--prefill-chunk", "--prompt", "--seed", "--serve-plan", "--temperature", "--top-p"],
    "serve": ["--api-key", "--concurrency", "--context-len", "--dtype", "--host", "--json", "--model", "--pool",
              "--port", "--prefill-chunk", "--serve-plan"],
}


def _flags(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_flags(sub, (*prefix, name)))
    own = sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help")
    if prefix and (own or not any(k.startswith(" ".join(prefix) + " ") for k in out)):
        out[" ".join(prefix)] = own
    return out


def test_public_flags_are_frozen():
    assert _flags(build_parser()) == FROZEN


def test_every_command_that_produces_results_takes_json():
    # Checked against FROZEN, which the test above checks against the real parser.
    assert all("--json" in flags for flags in FROZEN.values())
