"""Plan quality: chipfuse's predicted throughput divided by each simple strategy's, on every example pool.

For each pool in examples/ and a few model sizes, the search's plan is compared (same cost model, same
pool) with even split, fastest-only and proportional data parallelism; a strategy whose plan does
not fit in memory is reported but left out of the ratio. The search holds the simple strategies among
its own candidates, so a ratio below 1.0 would be a bug. Key figures: `min_ratio_vs_best_baseline`
(target: never below 1.0) and `geomean_ratio_vs_best_baseline`.

    .venv/bin/python benchmarks/plan_quality.py [--json PATH] [--budget S]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from chipfuse.cluster.pool import load_pool
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.search import NoPlanFits, search
from chipfuse.report.output import console, table, write_json
from chipfuse.sim.pipeline import simulate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gpt2-xl", "llama-7b", "llama-13b", "llama-70b")
SEQ_LEN = {"gpt2-xl": 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--budget", type=float, default=10.0, help="search time budget per case, seconds")
    args = ap.parse_args(argv)
    cases, rows, ratios, sims = [], [], [], []
    for path in sorted((ROOT / "examples").glob("*.toml")):
        pool = load_pool(path)
        if pool.emulated:
            continue
        for name in MODELS:
            model = SPEC_PRESETS[name]
            seq = SEQ_LEN.get(name, 4096)
            batch = max(256, len(pool.devices))
            try:
                res = search(pool, model, global_batch=batch, seq_len=seq, time_budget_s=args.budget)
            except NoPlanFits as e:
                cases.append({"pool": pool.name, "model": name, "refused": str(e)})
                rows.append([pool.name, name, "-", "-", "-", "-", "no plan fits"])
                continue
            ours = res.prediction.tokens_per_s
            # The simulator replays the chosen plan event by event on the same tables: how far apart?
            sim_ratio = simulate(res.plan, pool).step_s / res.prediction.step_s
            sims.append(sim_ratio)
            per = {k: (ours / v.prediction.tokens_per_s if v and v.prediction.fits else None)
                   for k, v in res.baselines.items()}
            fitting = [r for r in per.values() if r is not None]
            best = min(fitting) if fitting else None
            if best is not None:
                ratios.append(best)
            cases.append({"pool": pool.name, "model": name, "global_batch": batch, "seq_len": seq,
                          "tokens_per_s": ours, "mfu": res.prediction.mfu, "search_s": res.search_s,
                          "devices_used": len(res.plan.devices), "simulated_over_predicted": sim_ratio, "ratio_vs": per, "ratio_vs_best_baseline": best})
            fmt = {k: f"{v:.2f}" if v is not None else "no fit" for k, v in per.items()}
            rows.append([pool.name, name, f"{ours:,.0f}", f"{res.prediction.mfu:.1%}", fmt["even"], fmt["fastest-only"],
                         fmt["proportional-dp"] + (f"  (best {best:.2f})" if best else "")])
    console.print(table("chipfuse's predicted tokens/s divided by each simple strategy's",
                        ["pool", "model", "tokens/s", "MFU", "vs even", "vs fastest-only", "vs proportional-dp"], rows))
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
    low = min(ratios) if ratios else None
    console.print(f"min ratio vs best baseline: {low:.3f}; geometric mean: {geo:.3f} over {len(ratios)} cases "
                  "(predicted by the cost model, not measured)")
    console.print(f"simulated / predicted step of the chosen plans: {min(sims):.3f} .. {max(sims):.3f}")
    write_json(args.json, {"cases": cases, "min_ratio_vs_best_baseline": low, "geomean_ratio_vs_best_baseline": geo,
                           "simulated_over_predicted_range": [min(sims), max(sims)],
                           "predicted_not_measured": True, "emulated": False})
    return 0


if __name__ == "__main__":
    sys.exit(main())
