"""How faithfully emulated devices hold their declared speed ratios on this machine.

Runs `chipfuse train` on two emulated pools and compares each device's achieved throughput
(samples / compute seconds, padding included) with its declared relative speed. Prints and writes
`max_ratio_error` per pool: |achieved ratio to the fastest / declared ratio - 1|, worst device.

    .venv/bin/python benchmarks/emulation.py [--steps 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from chipfuse.cli import main as chipfuse
from chipfuse.report.output import console, table, write_json

POOLS = {
    "1 : 0.5 : 0.33": [0.6, 0.3, 0.2],
    "0.5 : 0.5 : 0.25": [0.5, 0.5, 0.25],
}


def pool_toml(speeds: list[float]) -> str:
    devs = "".join(f'[[node.device]]\nname = "d{i}"\nchip = "cpu"\nemulate = {{ speed = {s} }}\n'
                   for i, s in enumerate(speeds))
    return f'name = "fidelity"\n[[node]]\nname = "host"\n{devs}'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    results = {}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, speeds in POOLS.items():
            tmp = Path(d) / label.replace(" ", "").replace(":", "-")
            tmp.mkdir()
            (tmp / "pool.toml").write_text(pool_toml(speeds))
            out = tmp / "s.json"
            rc = chipfuse(["train", "--pool", str(tmp / "pool.toml"), "--model", "small", "--steps", str(args.steps),
                           "--global-batch", "48", "--run-dir", str(tmp), "--json", str(out), "--no-progress",
                           "--solo-samples", "0"])
            if rc:
                raise SystemExit(f"pool {label} failed")
            s = json.loads(out.read_text())
            tps = {k: v["tokens_per_s"] for k, v in s["devices"].items()}
            ref = max(speeds)
            ref_tps = tps[f"d{speeds.index(ref)}"]
            errs = {}
            for i, sp in enumerate(speeds):
                errs[f"d{i}"] = abs((tps[f"d{i}"] / ref_tps) / (sp / ref) - 1)
                rows.append([label, f"d{i}", sp, f"{tps[f'd{i}']:.0f}", f"{tps[f'd{i}'] / ref_tps:.3f}",
                             f"{sp / ref:.3f}", f"{errs[f'd{i}']:.1%}"])
            results[label] = {"speeds": speeds, "tokens_per_s": tps, "ratio_error": errs,
                              "max_ratio_error": max(errs.values())}
    console.print(table("emulation fidelity (EMULATED devices, padded to 1.1 x solo / speed)",
                        ["pool", "device", "speed", "tok/s", "ratio", "declared", "error"], rows))
    write_json(args.json, {"emulated": True, "pools": results,
                           "max_ratio_error": max(r["max_ratio_error"] for r in results.values())})


if __name__ == "__main__":
    main()
