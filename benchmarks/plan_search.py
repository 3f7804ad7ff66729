"""Search time of `chipfuse plan` for 8, 64 and 1024 devices with a 70B-class model (llama-70b).

Pools: 8 = 4 H100 + 4 A100-80GB (two nodes); 64 = 4 nodes of 8 H100 + 4 nodes of 8 A100-80GB;
1024 = examples/big-1024.toml (four chip types over 128 nodes). Targets on a 2-core machine:
at most 1 s at 64 devices and 10 s at 1024 (wall time; CPU time beside it, as other jobs may share the
machine). The search is given the target as its budget; the
figure beside it is the same search with a budget of 60 s (how long it takes when not cut short),
and the ratio of their predicted throughputs says what the budget cost in plan quality.

    .venv/bin/python benchmarks/plan_search.py [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chipfuse.cluster.pool import load_pool, pool_from_dict
from chipfuse.model.spec import SPEC_PRESETS
from chipfuse.plan.search import search
from chipfuse.report.output import console, table, write_json

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = {8: 1.0, 64: 1.0, 1024: 10.0}


def two_kind_pool(nodes_per_kind: int, per_node: int):
    nodes = [{"name": f"{tag}-{i}", "device": [{"name": f"{tag}-{i}-", "chip": chip, "count": per_node}]}
             for chip, tag in (("H100-SXM", "h100"), ("A100-SXM-80GB", "a100")) for i in range(nodes_per_kind)]
    return pool_from_dict({"name": f"h100-a100-{2 * nodes_per_kind * per_node}", "node": nodes,
                           "default_link": {"bandwidth_gbit_s": 400, "latency_ms": 0.01}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    model = SPEC_PRESETS["llama-70b"]
    pools = {8: two_kind_pool(1, 4), 64: two_kind_pool(4, 8), 1024: load_pool(ROOT / "examples" / "big-1024.toml")}
    out: dict = {"model": model.name, "global_batch": {}, "search_s": {}, "search_cpu_s": {}, "unbounded_search_s": {}, "tokens_per_s": {},
                 "quality_vs_unbounded": {}, "target_s": TARGET_S, "emulated": False}
    rows = []
    for n, pool in pools.items():
        batch = max(64, n)
        cpu0 = time.process_time()
        fast = search(pool, model, global_batch=batch, seq_len=4096, time_budget_s=TARGET_S[n])
        out["search_cpu_s"][n] = time.process_time() - cpu0
        slow = search(pool, model, global_batch=batch, seq_len=4096, time_budget_s=60.0)
        q = fast.prediction.tokens_per_s / slow.prediction.tokens_per_s
        out["global_batch"][n] = batch
        out["search_s"][n] = fast.search_s
        out["unbounded_search_s"][n] = slow.search_s
        out["tokens_per_s"][n] = fast.prediction.tokens_per_s
        out["quality_vs_unbounded"][n] = q
        rows.append([n, f"{fast.search_s:.2f}", f"{out['search_cpu_s'][n]:.2f}", f"{TARGET_S[n]:g}", f"{fast.search_s / TARGET_S[n]:.2f}",
                     f"{slow.search_s:.2f}", f"{q:.3f}", fast.candidates])
    console.print(table(f"plan search time, {model.name}, seq 4096",
                        ["devices", "search s", "cpu s", "target s", "search/target", "unbounded s", "quality vs unbounded",
                         "plans predicted"], rows))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
