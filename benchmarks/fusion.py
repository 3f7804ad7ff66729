"""Fusion efficiency of unequal data parallelism on an emulated 4 : 2 : 1 pool, in one run.

Measures, on the same emulated pool and model: tokens/s of each device alone, of an even split
(the Megatron/DDP default), and of chipfuse's speed-proportional shares. Prints and writes
`fusion_efficiency_even`, `fusion_efficiency_chipfuse`, `speedup_vs_even` (target >= 1.8, the
limit is 7/3) and `emulated: true`. Speeds 4 : 2 : 1 are scaled to 0.8 : 0.4 : 0.2 of one core so
the pool fits 2 cores (shared/notes/torch-on-cpu.md).

    .venv/bin/python benchmarks/fusion.py [--steps 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from chipfuse.cli import main as chipfuse
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.report.figures import checked_fields, checked_ratio
from chipfuse.report.output import console, table, write_json
from chipfuse.runtime.measure.probe import measure_unit_s

NO_OUTRUN = "a job cannot outrun its devices alone"
POOL = """
name = "emulated-4-2-1"
[[node]]
name = "host0"
[[node.device]]
name = "fast"
chip = "A100"
emulate = { speed = 0.8 }
[[node.device]]
name = "mid"
chip = "V100"
emulate = { speed = 0.4 }
[[node.device]]
name = "slow"
chip = "T4"
emulate = { speed = 0.2 }
"""


def run(tmp: Path, name: str, steps: int, unit_s: float, extra: list[str]) -> dict:
    out = tmp / f"{name}.json"
    rc = chipfuse(["train", "--pool", str(tmp / "pool.toml"), "--model", "small", "--steps", str(steps),
                   "--global-batch", "56", "--run-dir", str(tmp / name), "--json", str(out), "--no-progress",
                   "--unit-s", str(unit_s), *extra])
    if rc:
        raise SystemExit(f"{name} run failed ({rc})")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "pool.toml").write_text(POOL)
        # One pacing unit for both runs, measured here once: the same emulated chip, the same speed.
        unit = measure_unit_s(SPEC_PRESETS["small"])
        # The even baseline keeps its shares: chipfuse's online rebalancing would otherwise move it.
        even = run(tmp, "even", args.steps, unit, ["--even", "--no-rebalance"])
        ours = run(tmp, "chipfuse", args.steps, unit, [])
    # Standalone throughput of each device: measured alone (the others idle) at the start of each
    # run; averaged over the two runs.
    solo = {k: (even["solo_tokens_per_s"][k] + ours["solo_tokens_per_s"][k]) / 2 for k in ours["solo_tokens_per_s"]}
    solo_sum = sum(solo.values())
    res = {
        "emulated": True,
        "pool": "fast x0.8, mid x0.4, slow x0.2 (4 : 2 : 1, emulated on CPU workers)",
        "model": ours["model"],
        "steps": args.steps,
        "unit_s": unit,
        "load_average_1min": os.getloadavg()[0],
        "solo_tokens_per_s": solo,
        "tokens_per_s_even": even["tokens_per_s"],
        "tokens_per_s_chipfuse": ours["tokens_per_s"],
        "shares_even": even["shares"],
        "shares_chipfuse": ours["shares"],
        # A ratio past its limit is a measurement fault with its reason, never a result (report/figures.py).
        **checked_fields("fusion_efficiency_even", checked_ratio(even["tokens_per_s"], solo_sum, hi=1.0,
                                                                 what="fusion efficiency (even)", why=NO_OUTRUN)),
        **checked_fields("fusion_efficiency_chipfuse", checked_ratio(ours["tokens_per_s"], solo_sum, hi=1.0,
                                                                     what="fusion efficiency (chipfuse)",
                                                                     why=NO_OUTRUN)),
        # What `chipfuse train` itself printed for this pool (its own standalone measurement).
        "fusion_efficiency_reported_by_train": ours.get("fusion_efficiency"),
        **checked_fields("speedup_vs_even", checked_ratio(ours["tokens_per_s"], even["tokens_per_s"], hi=7 / 3,
                                                          what="speedup over even shares",
                                                          why="4:2:1 speeds allow at most 7/3")),
        "wait_s_mean_chipfuse": {k: v["wait_s_mean"] for k, v in ours["devices"].items()},
        "wait_s_mean_even": {k: v["wait_s_mean"] for k, v in even["devices"].items()},
        "final_loss_even": even["final_loss"],
        "final_loss_chipfuse": ours["final_loss"],
    }
    rows = [[k, f"{solo[k]:.0f}", even["shares"][k], ours["shares"][k],
             f"{res['wait_s_mean_even'][k] * 1e3:.0f}", f"{res['wait_s_mean_chipfuse'][k] * 1e3:.0f}"] for k in solo]
    console.print(table("fusion benchmark (EMULATED devices)", ["device", "alone tok/s", "even share",
                                                                  "chipfuse share", "even wait ms", "chipfuse wait ms"], rows))
    def show(key: str) -> str:
        return f"{res[key]:.3f}" if res[key] is not None else f"n/a ({res[key + '_fault']})"

    console.print(f"sum alone {solo_sum:.0f} tok/s | even {even['tokens_per_s']:.0f} tok/s "
                  f"(fusion efficiency {show('fusion_efficiency_even')}) | chipfuse {ours['tokens_per_s']:.0f} tok/s "
                  f"(fusion efficiency {show('fusion_efficiency_chipfuse')}) | speedup_vs_even "
                  f"{show('speedup_vs_even')} (limit 7/3 = 2.33)")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
