"""A straggler mid-run: one emulated device drops to half speed; online rebalancing versus fixed shares.

Three emulated devices of speed 0.25 train the `small` GPT with equal shares; from step
`--slow-at` device `c` runs at half speed (its pacer pads every micro-batch to twice the time).
The same job runs twice in this one invocation: with chipfuse's online rebalancing, and with
`--no-rebalance` (the shares stay fixed). Prints and writes `speedup_vs_static`: tokens/s after the
slowdown (detection included) with rebalancing / without. Target >= 1.3; the limit for
1 : 1 : 0.5 after 1 : 1 : 1 is 1.6 (shares 10 : 9 : 5 of 24 against 8 : 8 : 8).

Both runs pace to one unit (seconds per sample of an unslowed worker) measured here once
(`--unit-s`), not each at its own start-up: on a shared 2-core machine two start-up calibrations
can differ by 2x and would swamp the comparison. Speeds of 0.25 keep every step padding-bound (the
real compute is under a quarter of the paced time), so other load on the machine barely moves it.
`speedup_vs_static_normalized` divides each run's throughput by its own before the slowdown.

    .venv/bin/python benchmarks/straggler.py [--steps 36] [--slow-at 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from chipfuse.cli import main as chipfuse
from chipfuse.report.output import console, table, write_json

POOL = """
name = "three-equal-emulated"
[[node]]
name = "host0"
[[node.device]]
name = "a"
chip = "V100"
emulate = { speed = 0.25 }
[[node.device]]
name = "b"
chip = "V100"
emulate = { speed = 0.25 }
[[node.device]]
name = "c"
chip = "V100"
emulate = { speed = 0.25 }
"""


def unit_s(micro_batch: int = 4) -> float:
    """Seconds per sample of one unslowed worker (one thread) on the `small` model, best of 5."""
    from chipfuse.model.spec import SPEC_PRESETS
    from chipfuse.runtime.measure.probe import measure_unit_s

    return measure_unit_s(SPEC_PRESETS["small"], micro_batch=micro_batch)


def run(tmp: Path, name: str, args: argparse.Namespace, extra: list[str]) -> tuple[dict, list[dict]]:
    out = tmp / f"{name}.json"
    rc = chipfuse(["train", "--pool", str(tmp / "pool.toml"), "--model", "small", "--steps", str(args.steps),
                   "--global-batch", "24", "--micro-batch", "4", "--solo-samples", "0", "--run-dir", str(tmp / name),
                   "--json", str(out), "--no-progress", "--slowdown", f"c@{args.slow_at}:0.5",
                   "--unit-s", str(args.unit_s), *extra])
    if rc:
        raise SystemExit(f"{name} run failed ({rc})")
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), rows


def tokens_per_s(rows: list[dict], first: int) -> float:
    rows = [r for r in rows if r["step"] >= first]
    return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--slow-at", type=int, default=12)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    args.unit_s = unit_s()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "pool.toml").write_text(POOL)
        static, static_rows = run(tmp, "static", args, ["--no-rebalance"])
        ours, rows = run(tmp, "rebalance", args, [])
    events = [r["rebalance"] for r in rows if "rebalance" in r]
    settled = events[-1]["step"] + 1 if events else args.slow_at
    res = {
        "emulated": True,
        "pool": "a, b, c at speed 0.25 each (emulated on CPU workers); c drops to 0.125 at step "
                f"{args.slow_at}",
        "unit_s": args.unit_s,
        "model": ours["model"],
        "steps": args.steps,
        "slow_at": args.slow_at,
        "tokens_per_s_before_static": tokens_per_s(static_rows[: args.slow_at], 2),
        "tokens_per_s_before_rebalance": tokens_per_s(rows[: args.slow_at], 2),
        "tokens_per_s_after_static": tokens_per_s(static_rows, args.slow_at),
        "tokens_per_s_after_rebalance": tokens_per_s(rows, args.slow_at),
        "tokens_per_s_after_settled_rebalance": tokens_per_s(rows, settled),
        "rebalances": events,
        "shares_static": static["shares"],
        "shares_final": ours["shares"],
        "final_loss_static": static["final_loss"],
        "final_loss_rebalance": ours["final_loss"],
    }
    kept_static = res["tokens_per_s_after_static"] / res["tokens_per_s_before_static"]
    res["speedup_vs_static"] = res["tokens_per_s_after_rebalance"] / res["tokens_per_s_after_static"]
    res["speedup_vs_static_settled"] = res["tokens_per_s_after_settled_rebalance"] / res["tokens_per_s_after_static"]
    res["speedup_vs_static_normalized"] = (res["tokens_per_s_after_rebalance"] / res["tokens_per_s_before_rebalance"]
                                           / kept_static)
    console.print(table("straggler benchmark (EMULATED devices)", ["event", "step", "shares", "reason"],
                        [["rebalance", e["step"], e["new_shares"], e["reason"]] for e in events]))
    console.print(f"tok/s before -> after c slows at step {args.slow_at}: fixed shares "
                  f"{res['tokens_per_s_before_static']:.0f} -> {res['tokens_per_s_after_static']:.0f}, rebalanced "
                  f"{res['tokens_per_s_before_rebalance']:.0f} -> {res['tokens_per_s_after_rebalance']:.0f} "
                  f"(detection included) | speedup_vs_static {res['speedup_vs_static']:.2f} (target 1.3, limit 1.6; "
                  f"after the last rebalance {res['speedup_vs_static_settled']:.2f}, normalized "
                  f"{res['speedup_vs_static_normalized']:.2f}) | EMULATED devices")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
